"""The event loop of ``serve`` and ``authd``: the choice, the fallback, the log line, and both
commands running for real on uvloop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from broker.errors import ServeError
from broker.loop import EventLoopChoice, loop_factory
from config import Settings
from tests.authd_support import authd_process, migrate, write_authd_config
from tests.helpers import connack_code, free_port, write_config
from tests.test_serve import serving

# slow, the whole file: runs mqttprov serve and authd processes.
pytestmark = pytest.mark.slow

MAC_CLIENT_ID = "aa:bb:cc:dd:ee:42"


@pytest.fixture
def uvloop() -> ModuleType:
    """The uvloop module (tests that need it skip where it does not install)."""
    module: ModuleType = pytest.importorskip("uvloop")
    return module


def _made(choice: EventLoopChoice, caplog: pytest.LogCaptureFixture) -> tuple[type, list[str]]:
    """The class of the loop the factory makes, and what it logged."""
    caplog.set_level(logging.INFO, logger="broker.loop")
    loop = loop_factory(choice)()
    try:
        return type(loop), [r.getMessage() for r in caplog.records if r.name == "broker.loop"]
    finally:
        loop.close()


def test_auto_takes_uvloop_when_it_is_installed(uvloop: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    kind, lines = _made("auto", caplog)
    assert issubclass(kind, uvloop.Loop)
    assert lines == [f"event loop: uvloop {uvloop.__version__}"]


def test_asyncio_is_never_uvloop(caplog: pytest.LogCaptureFixture) -> None:
    kind, lines = _made("asyncio", caplog)
    assert issubclass(kind, asyncio.BaseEventLoop)  # asyncio's own (uvloop's Loop is not one)
    assert lines == ["event loop: asyncio"]


def test_auto_falls_back_to_asyncio_without_uvloop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError
    kind, lines = _made("auto", caplog)
    assert issubclass(kind, asyncio.BaseEventLoop)
    assert lines == ["event loop: asyncio (uvloop is not installed)"]


def test_uvloop_demanded_but_missing_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    make = loop_factory("uvloop")  # nothing is looked up before the loop is made
    with pytest.raises(ServeError, match=r"^event_loop = 'uvloop' but uvloop is not installed"):
        make()


def test_the_setting_defaults_to_auto_and_takes_only_the_three_loops() -> None:
    assert Settings().broker.event_loop == "auto"
    assert Settings.model_validate({"broker": {"event_loop": "uvloop"}}).broker.event_loop == "uvloop"
    with pytest.raises(ValidationError, match="event_loop"):
        Settings.model_validate({"broker": {"event_loop": "tokio"}})


async def test_serve_runs_on_uvloop_from_the_environment(
    uvloop: ModuleType, tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTTPROV_BROKER__EVENT_LOOP", "uvloop")
    port = free_port()
    config = write_config(
        tmp_path / "mqttprov.toml",
        {"broker": {"host": "127.0.0.1", "port": port}, "database": {"url": sqlite_url}},
    )
    async with serving(config, tmp_path) as served:
        # Open provisioning (the default) accepts a MAC's session; an anonymous client is refused.
        assert await asyncio.to_thread(connack_code, "127.0.0.1", port, MAC_CLIENT_ID) == 0
        assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == 5
        assert await served.stop(signal.SIGTERM) == 0
    assert served.messages[0] == f"event loop: uvloop {uvloop.__version__}"
    assert served.messages[-1] == "broker stopped"
    assert not any("Traceback" in line for line in served.lines), "\n".join(served.lines)


async def test_authd_runs_on_uvloop_from_the_environment(
    uvloop: ModuleType, tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTTPROV_BROKER__EVENT_LOOP", "uvloop")
    await migrate(sqlite_url)
    port = free_port()
    config = write_authd_config(tmp_path / "mqttprov.toml", sqlite_url, port)
    with authd_process(config, port, tmp_path):  # healthy, then exit code 0 after SIGTERM
        pass
    log = (tmp_path / f"authd-{port}.log").read_text()
    assert f"event loop: uvloop {uvloop.__version__}" in log
    assert "authd stopped" in log
