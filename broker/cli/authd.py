"""``mqttprov authd``: run the HTTP auth service for production brokers."""

from __future__ import annotations

from broker.cli.common import ConfigOption, run, settings_from
from broker.loop import loop_factory


def authd(config: ConfigOption = None) -> None:
    """Answer the auth callbacks of RabbitMQ, EMQX, VerneMQ and mosquitto-go-auth until SIGINT/SIGTERM."""
    # Imported here, not at the top: aiohttp (~10 MB) is for authd only, and every command,
    # `mqttprov serve` included, loads this module.
    from broker.http.authd import run_authd  # noqa: PLC0415

    settings = settings_from(config)
    run(
        lambda: run_authd(settings),
        log=settings.log,
        loop_factory=loop_factory(settings.broker.event_loop),
    )
