"""``mqttprov api``: run the HTTP management API on its own, beside authd or a broker."""

from __future__ import annotations

from broker.cli.common import ConfigOption, run, settings_from
from broker.loop import loop_factory


def api(config: ConfigOption = None) -> None:
    """Serve the HTTP management API ([api] host and port; docs at /docs) until SIGINT/SIGTERM."""
    # Imported here, not at the top: FastAPI and uvicorn are for this command (and serve with
    # [api] enabled) only, and every command loads this module.
    from broker.http.api import run_api  # noqa: PLC0415

    settings = settings_from(config)
    run(
        lambda: run_api(settings),
        log=settings.log,
        loop_factory=loop_factory(settings.broker.event_loop),
    )
