"""Log hygiene: what a client controls is shown short and escaped, refusals once per burst."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import broker.embedded.base
import broker.embedded.plugins.auth
from auth_plugin.logsafe import MAX_SHOWN, BurstLog, shown
from broker.embedded import BrokerServer
from broker.errors import REFUSED_MARKER
from tests.auth_support import ACCOUNT_PASSWORD, login_code, make_account, settings
from tests.test_hardening_subscriptions import Wire

HUGE = 65_000  # a client id is at most 65,535 bytes


class Captured(logging.Handler):
    """Every record at INFO and up, formatted as serve formats it; an event per burst summary."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self.summaries = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if REFUSED_MARKER in record.getMessage():
            return  # amqtt's echo of our refusal, which serve's logging drops (broker.logs)
        line = self.format(record)
        self.lines.append(line)
        if "(one line per burst)" in line:
            self.summaries.set()

    @property
    def size(self) -> int:
        return sum(len(line.encode()) + 1 for line in self.lines)


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root, amqtt = logging.getLogger(), logging.getLogger("amqtt")
    levels = root.level, amqtt.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    amqtt.setLevel(logging.WARNING)  # as serve sets it (broker.logs): amqtt logs each connection
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        amqtt.setLevel(levels[1])


@pytest.fixture
async def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BrokerServer]:
    # Bursts short enough for the test to see one end.
    monkeypatch.setattr(broker.embedded.plugins.auth._refused, "window", 1.0)
    monkeypatch.setattr(broker.embedded.base.over_limits, "window", 1.0)
    config = settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", throttle_after=10_000, lockout_after=10_000)
    async with BrokerServer(config) as running:
        await make_account(running.accounts, "svc", ["subscribe devices/#"])
        yield running


def test_shown_truncates_and_escapes() -> None:
    assert shown("plain") == "'plain'"
    assert shown(None) == "None"
    assert shown("a\nb\x1b[2J\u202e") == repr("a\nb\x1b[2J\u202e")
    long = shown("x" * HUGE)
    assert long.startswith(repr("x" * MAX_SHOWN))
    assert long.endswith(f"({HUGE} characters)")
    assert len(long) < MAX_SHOWN + 40


@pytest.mark.slow
async def test_huge_client_ids_and_refusal_bursts_write_a_bounded_log(
    server: BrokerServer, captured: Captured
) -> None:
    port = server.settings.broker.port
    huge = "\n" + "x" * HUGE
    attempts = 50

    def flood() -> tuple[list[int], list[int]]:
        codes = [login_code(port, huge, username="nobody", password="x") for _ in range(attempts)]
        wire = Wire(port, "svc-" + huge, username="svc", password=ACCOUNT_PASSWORD)
        try:
            refused = [wire.subscribe([f"devices/{n}/#" for n in range(100)]) for _ in range(attempts)]
        finally:
            wire.disconnect()
        return codes, [code for codes in refused for code in codes]

    codes, subacks = await asyncio.to_thread(flood)
    assert codes == [4] * attempts
    assert subacks.count(0x80) == attempts * 68  # past 32 filters in each SUBSCRIBE
    assert await asyncio.to_thread(captured.summaries.wait, 5)
    refusals = [line for line in captured.lines if "refused" in line]
    # One line to start each burst and one to count it, per kind; never one per refusal.
    assert len(refusals) <= 8, refusals
    assert not any("\nx" in line or "x" * (MAX_SHOWN + 1) in line for line in captured.lines)
    assert captured.size < 8_192, captured.lines


def test_a_burst_is_one_line_and_its_count_without_a_loop(caplog: pytest.LogCaptureFixture) -> None:
    log = BurstLog(logging.getLogger("tests.burst"), "probes refused", window=3600)
    with caplog.at_level(logging.INFO, logger="tests.burst"):
        for n in range(1_000):
            log.refused("probe %d refused", n)
        log.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "probe 0 refused",
        caplog.records[1].getMessage(),
    ]
    assert caplog.records[1].getMessage().startswith("probes refused: 999 more in ")
