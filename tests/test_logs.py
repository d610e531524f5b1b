"""``[log]``: text or one JSON object per line, and no client-controlled value breaks a line."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from auth_plugin.logsafe import shown
from broker.logs import JSON_KEYS, JsonFormatter, TextFormatter, configure_logging, escaped
from config import ConfigError, LogSettings, load_settings
from tests.helpers import connack_code, free_port, preserved_logging, write_config
from tests.test_serve import serving

#: A client id that tries to forge a record of its own in either format, to clear the terminal
#: and to end the line in every way Python's ``str.splitlines`` knows (all but U+0000, which
#: MQTT forbids in a string: the broker drops such a CONNECT unread).
HOSTILE = (
    'evil\n2026-01-01 00:00:00,000 INFO    broker: forged\r\n{"level": "INFO", "msg": "forged"}'
    "\x1b[2J\x85\u2028\u2029\x1c\x1d\x1e\x0b\x0c\t\u00e9"
)
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) *\S+: ")


def _record(message: str, *args: object, raised: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if raised:
        try:
            raise ValueError("bad\nvalue " + HOSTILE)
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("mqttprov.test", logging.WARNING, __file__, 1, message, args, exc_info)
    record.__dict__.update(extra)
    return record


def _one_line(text: str) -> str:
    assert len(text.splitlines()) == 1, text
    return text


def test_json_line_has_the_documented_keys_in_order() -> None:
    line = _one_line(JsonFormatter().format(_record("refused client=%s", HOSTILE)))
    entry = json.loads(line)
    assert tuple(entry) == JSON_KEYS
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "mqttprov.test"
    assert entry["msg"] == f"refused client={HOSTILE}"  # escaped in the line, whole once parsed
    assert entry["ts"].endswith("Z")
    stamp = datetime.fromisoformat(entry["ts"])
    assert stamp.tzinfo == UTC
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert line.isascii()


def test_json_line_carries_extra_fields_and_the_exception() -> None:
    record = _record(
        "failed", raised=True, device_id=7, when=datetime(2026, 1, 1, tzinfo=UTC), level="x", exc="y"
    )
    entry = json.loads(_one_line(JsonFormatter().format(record)))
    assert entry["device_id"] == 7
    assert entry["when"] == "2026-01-01 00:00:00+00:00"  # not JSON: written as str()
    # An extra named like a documented key does not replace it.
    assert entry["level"] == "WARNING"
    assert entry["extra_level"] == "x"
    assert entry["extra_exc"] == "y"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert entry["exc"].endswith("ValueError: bad\nvalue " + HOSTILE)


def test_text_line_escapes_the_message_and_indents_a_traceback() -> None:
    text = TextFormatter().format(_record("refused client=%s", HOSTILE, raised=True))
    first, *rest = text.split("\n")
    assert TEXT_LINE.match(first)
    assert first.endswith("refused client=" + escaped(HOSTILE))
    assert "\\n2026-01-01" in first
    assert "\x1b" not in text
    assert "\r" not in text
    assert rest[0] == "    Traceback (most recent call last):"
    # Each "\n" of the exception's text starts another indented line; the rest is escaped.
    shown_exc = ["    " + escaped(part) for part in f"ValueError: bad\nvalue {HOSTILE}".split("\n")]
    assert rest[-len(shown_exc) :] == shown_exc
    assert all(line.startswith("    ") for line in rest)
    assert len(text.splitlines()) == len(rest) + 1  # no line break but the traceback's own


def test_escaped_leaves_plain_text_alone() -> None:
    assert escaped("client='dev-1' é ✓") == "client='dev-1' é ✓"
    assert escaped("a\nb\x1b\u2028") == "a\\nb\\x1b\\u2028"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    with preserved_logging():
        yield


@pytest.mark.usefixtures("restored_logging")
def test_configure_logging_json_level_and_debug(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="WARNING", log_format="json")
    logging.getLogger("mqttprov.test").info("not shown")
    logging.getLogger("mqttprov.test").warning("shown %s", 1)
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["shown 1"]
    assert logging.getLogger("amqtt").level == logging.WARNING

    configure_logging(level="ERROR", log_format="json")
    assert logging.getLogger("amqtt").level == logging.ERROR  # libraries never louder than ours

    configure_logging(debug=True, level="ERROR", log_format="json")  # --debug wins over [log] level
    logging.getLogger("amqtt").debug("library detail")
    assert json.loads(capsys.readouterr().err)["level"] == "DEBUG"


def test_log_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert LogSettings() == LogSettings(level="INFO", format="text")
    assert LogSettings.model_validate({"level": "debug"}).level == "DEBUG"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MQTTPROV_LOG__FORMAT", "json")
    monkeypatch.setenv("MQTTPROV_LOG__LEVEL", "warning")
    assert load_settings().log == LogSettings(level="WARNING", format="json")
    monkeypatch.setenv("MQTTPROV_LOG__FORMAT", "xml")
    with pytest.raises(ConfigError, match=r"^config error: log\.format: "):
        load_settings()


async def _serve_and_refuse(tmp_path: Path, sqlite_url: str, log_format: str) -> list[str]:
    """The stderr lines of a real ``mqttprov serve`` that refused a hostile CONNECT, then stopped."""
    port = free_port()
    config = write_config(
        tmp_path / "mqttprov.toml",
        {
            "broker": {"host": "127.0.0.1", "port": port},
            "database": {"url": sqlite_url},
            "log": {"format": log_format},
        },
    )
    async with serving(config, tmp_path) as served:
        code = await asyncio.to_thread(
            connack_code, "127.0.0.1", port, client_id=HOSTILE, username=HOSTILE, password="x"
        )
        assert code == 4  # an unknown username
        await served.read_until("connect refused")
        assert await served.stop(signal.SIGTERM) == 0
    return served.lines


@pytest.mark.slow
async def test_serve_writes_json_lines(tmp_path: Path, sqlite_url: str) -> None:
    lines = await _serve_and_refuse(tmp_path, sqlite_url, "json")
    entries = [json.loads(line) for line in lines]  # every line, or this fails
    for entry in entries:
        assert tuple(entry)[:4] == JSON_KEYS, entry
        assert entry["level"] in {"INFO", "WARNING"}, entry
    messages = [entry["msg"] for entry in entries]
    refused = [message for message in messages if message.startswith("connect refused")]
    assert len(refused) == 1, messages
    # The client id as logsafe shows it: quoted and escaped, inside a JSON string.
    assert f"client={shown(HOSTILE)}" in refused[0]
    assert all(line.isascii() for line in lines)
    assert any(message.startswith("broker started") for message in messages)
    assert messages[-1] == "broker stopped"


@pytest.mark.slow
async def test_serve_text_lines_stay_lines(tmp_path: Path, sqlite_url: str) -> None:
    lines = await _serve_and_refuse(tmp_path, sqlite_url, "text")
    for line in lines:
        assert TEXT_LINE.match(line) or line.startswith("    "), line
        assert len(line.splitlines()) == 1, line
        assert "\x1b" not in line
        assert not line.startswith(("{", "2026-01-01")), line
    assert any(f"client={shown(HOSTILE)}" in line for line in lines)
