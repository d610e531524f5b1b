"""Process-wide logging set-up for ``mqttprov`` commands: text for people, JSON lines for pipelines.

Either way one record is one line: control characters a message carries (a client's value that
slipped past :func:`auth_plugin.logsafe.shown`, a library's multi-line message) are escaped, and
in text a traceback's lines are indented under the record they belong to.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from broker.errors import REFUSED_MARKER

LogFormat = Literal["text", "json"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: C0 and C1 controls, DEL and the Unicode line and paragraph separators: anything a reader of
#: the stream (``str.splitlines``, a terminal) could take for a line break or an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: The attributes every LogRecord has; the others on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    {*logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__, "message", "asctime"}
)
#: The keys of a JSON line, in order (README, "Logs"); ``exc`` and ``stack`` only when present.
JSON_KEYS = ("ts", "level", "logger", "msg")

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


def escaped(text: str) -> str:
    """``text`` with every control character written as its Python escape (``\\n``, ``\\x1b``)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, the message escaped to one line; a traceback follows,
    each of its lines indented so that none can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__(_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escaped(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    # Split on "\n" alone: the other line breaks splitlines() knows are escaped within a line.
    return "\n".join("    " + escaped(line) for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (non-ASCII and controls escaped by :func:`json.dumps`).

    Keys: ``ts`` (ISO-8601, UTC, milliseconds), ``level``, ``logger``, ``msg``, then any ``extra=``
    fields (one named like a key above is written as ``extra_<name>``), ``exc`` (the formatted
    exception) and ``stack`` (``stack_info``) when the record has them.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        entry: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                entry[f"extra_{key}" if key in entry or key in ("exc", "stack") else key] = value
        if record.exc_info:
            # Cached on the record as logging.Formatter does, for any other handler.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra field of any type still makes a line rather than a logging error.
        return json.dumps(entry, default=str)


def _utc(created: float) -> str:
    """``2026-12-07T10:15:02.123Z``."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(
    *, debug: bool = False, level: int | str = logging.INFO, log_format: LogFormat = "text"
) -> None:
    """Log to stderr in ``log_format``: ``level`` and up for mqttprov, ``level`` but at least
    WARNING for libraries; with ``debug``, DEBUG and up for everything (the format stays)."""
    number = level if isinstance(level, int) else logging.getLevelNamesMapping()[level]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if not debug:
        handler.addFilter(_DropAmqttStartupTraceback())
        handler.addFilter(_DropClientResetTraceback())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else number)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else max(number, logging.WARNING))
