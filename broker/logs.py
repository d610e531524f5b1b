"""Process-wide logging set-up for ``mqttprov`` commands."""

from __future__ import annotations

import logging
import sys

from broker.errors import REFUSED_MARKER

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Chatty third-party loggers: amqtt logs every connection at INFO and reports its own start-up
# failures with a traceback, which we turn into one line ourselves.
_QUIET = ("amqtt", "transitions", "alembic", "websockets", "aiosqlite", "asyncio")


class _DropAmqttStartupTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "amqtt.broker":
            return True
        message = record.getMessage()
        # We report start-up failures in one line, and refused connections once, ourselves.
        return message != "Broker startup failed" and REFUSED_MARKER not in message


class _DropClientResetTraceback(logging.Filter):
    # A client that drops its TLS connection while amqtt closes it (e.g. right after a refused
    # CONNACK) surfaces as asyncio's "Unhandled exception in client_connected_cb" with a
    # ConnectionResetError traceback: routine for devices, not a bug, so not worth a traceback.
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "asyncio"
            and record.exc_info is not None
            and isinstance(record.exc_info[1], ConnectionError)
            and record.getMessage().startswith("Unhandled exception in client_connected_cb")
        )


def configure_logging(*, debug: bool = False, level: int = logging.INFO) -> None:
    """Log to stderr: ``level`` and up for mqttprov, WARNING and up for libraries; DEBUG everything."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    if not debug:
        handler.addFilter(_DropAmqttStartupTraceback())
        handler.addFilter(_DropClientResetTraceback())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
