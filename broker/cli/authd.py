"""``mqttprov authd``: run the HTTP auth service for production brokers."""

from __future__ import annotations

import logging

from broker.authd import run_authd
from broker.cli.common import ConfigOption, run, settings_from


def authd(config: ConfigOption = None) -> None:
    """Answer the auth callbacks of RabbitMQ, EMQX, VerneMQ and mosquitto-go-auth until SIGINT/SIGTERM."""
    settings = settings_from(config)
    run(lambda: run_authd(settings), log_level=logging.INFO)
