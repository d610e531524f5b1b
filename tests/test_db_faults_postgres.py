"""Database faults through a real connection: a fault-injecting proxy between the processes under
test and the test's own PostgreSQL database (the CLI's engine, like an operator's, goes direct).

A cut connection gets its LISTEN back, a refused one is an outage the follower rides out (the
cache stops vouching for logins meanwhile, and the change made during it is applied after), and
a stalled one does not hold a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from auth_plugin.authenticator import ConnectAttempt
from auth_plugin.principals import Principal
from auth_plugin.revocation import Revoker
from broker.core import AuthCore, Supervised, auth_core
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import DeviceInfo, DeviceRegistry, create_engine
from provisioning.registry.transactions import CHANGES_CHANNEL
from tests.auth_support import PASSWORD, eventually, make_device, polled
from tests.authd_support import migrate, write_authd_config
from tests.faulty_proxy import FaultyProxy
from tests.helpers import broker_settings, free_port, mqttprov_executable, write_config
from tests.test_revocation import Sessions

# slow, the whole file: a PostgreSQL fault proxy and mqttprov processes.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: Generous: what the documentation promises (30 s) with room for a loaded test machine.
SHUTDOWN_DEADLINE = 60.0


def _through(url: str, proxy: FaultyProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[FaultyProxy]:
    url = make_url(postgres_url)
    async with FaultyProxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


@dataclass
class Broker:
    """A broker process's core and follower, behind the proxy; the CLI's registry, direct."""

    core: AuthCore
    cli: DeviceRegistry
    sessions: Sessions
    revoker: Revoker

    async def login(self, device: DeviceInfo) -> Principal | None:
        """A CONNECT answered by this broker (None: refused, or the registry could not answer)."""
        user = device.mqtt_username
        try:
            principal = (
                await self.core.authenticator.authenticate(ConnectAttempt(user, user, PASSWORD))
            ).principal
        except RegistryUnavailableError:
            return None
        if principal is not None:
            self.sessions.live[user] = principal
        return principal

    async def kicked(self, device: DeviceInfo) -> None:
        """Wait until the follower throws the device's session off."""
        while await asyncio.wait_for(self.sessions.kicked.get(), 30) != device.mqtt_username:
            pass


@pytest.fixture
async def broker(
    postgres_url: str, proxy: FaultyProxy, request: pytest.FixtureRequest
) -> AsyncIterator[Broker]:
    """A broker polling every 0.05 s, or as often as an indirect parameter says."""
    interval = float(getattr(request, "param", 0.05))
    await migrate(postgres_url)
    core = auth_core(broker_settings(_through(postgres_url, proxy)))
    sessions = Sessions()
    revoker = Revoker(core.registry, core.accounts, core.authenticator.cache, sessions, interval=interval)
    cli = DeviceRegistry(create_engine(postgres_url))
    try:
        yield Broker(core, cli, sessions, revoker)
    finally:
        await core.close()
        await cli.close()


# A poll an hour apart: only a NOTIFY (or a lost connection) can wake the follower.
@pytest.mark.parametrize("broker", [3600], indirect=True, ids=["hourly-poll"])
async def test_listen_is_opened_again_after_its_connection_is_cut_and_a_notify_wakes_the_follower(
    broker: Broker, proxy: FaultyProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    revoker = broker.revoker
    device = await make_device(broker.cli, "02:00:00:00:0f:11")
    assert await broker.login(device) is not None
    follower = Supervised("test-follower", revoker).start()
    await eventually(polled(lambda: revoker.listens_opened), lambda opened: opened == 1)

    proxy.cut()  # a PostgreSQL restart, as the broker sees it
    await eventually(polled(lambda: revoker.listens_opened), lambda opened: opened == 2, timeout=30)
    await broker.cli.decommission(device.id)
    await broker.kicked(device)
    await follower.stop()

    reopened = [r for r in caplog.records if r.getMessage().startswith(f"LISTEN on {CHANGES_CHANNEL}")]
    assert [(r.levelname, r.getMessage()) for r in reopened] == [
        ("INFO", f"LISTEN on {CHANGES_CHANNEL} re-established after a lost connection")
    ]


async def test_through_an_outage_cached_logins_lose_their_trust_and_the_change_made_meanwhile_is_applied(
    broker: Broker,
    proxy: FaultyProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cache = broker.core.authenticator.cache
    first = await make_device(broker.cli, "02:00:00:00:0f:12")
    later = await make_device(broker.cli, "02:00:00:00:0f:13")
    assert await broker.login(first) is not None
    assert await broker.login(later) is not None
    monkeypatch.setattr(broker.revoker, "trust_window", 0.5)
    follower = Supervised("test-follower", broker.revoker).start()
    await eventually(polled(lambda: broker.revoker.position), lambda position: position is not None)

    await proxy.set_mode("refuse")  # the broker is cut off from the database; the CLI is not
    await broker.cli.decommission(first.id)
    assert not await eventually(polled(lambda: cache.fresh), lambda fresh: not fresh)
    assert cache.principal(first.mqtt_username, PASSWORD) is None
    assert await broker.login(first) is None  # not from the cache: the registry, unavailable

    await proxy.set_mode("pass")
    await broker.kicked(first)  # the change made during the outage, applied after it
    await broker.cli.decommission(later.id)
    await broker.kicked(later)
    assert await broker.login(later) is None
    await follower.stop()

    story = [r for r in caplog.records if r.getMessage().startswith("database ")]
    assert [r.levelname for r in story] == ["WARNING", "INFO"], [r.getMessage() for r in story]
    assert story[1].getMessage().startswith("database recovered after")
    assert all(r.exc_info is None for r in story)


async def test_a_follower_stuck_on_a_stalled_database_stops_within_its_deadline(
    broker: Broker, proxy: FaultyProxy
) -> None:
    follower = Supervised("test-follower", broker.revoker).start()
    await eventually(polled(lambda: broker.revoker.position), lambda position: position is not None)
    await proxy.set_mode("stall")
    await eventually(polled(lambda: proxy.held), lambda held: held > 0)

    started = time.monotonic()
    await asyncio.wait_for(follower.stop(within=1.0), SHUTDOWN_DEADLINE)
    assert time.monotonic() - started < SHUTDOWN_DEADLINE


async def _started(
    command: str, config: Path, cwd: Path, ready: str
) -> tuple[asyncio.subprocess.Process, list[str]]:
    """``mqttprov COMMAND --config CONFIG`` once it logged ``ready``; with the lines read so far."""
    process = await asyncio.create_subprocess_exec(
        mqttprov_executable(),
        command,
        "--config",
        str(config),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    while not lines or ready not in lines[-1]:
        raw = await asyncio.wait_for(process.stderr.readline(), 30)
        if not raw:
            raise AssertionError(f"{command} ended before logging {ready!r}: {lines}")
        lines.append(raw.decode().rstrip("\n"))
    return process, lines


@pytest.mark.parametrize("command", ["serve", "authd"])
async def test_sigterm_ends_the_process_with_the_database_stalled(
    postgres_url: str, proxy: FaultyProxy, tmp_path: Path, command: str
) -> None:
    await migrate(postgres_url)
    url, port = _through(postgres_url, proxy), free_port()
    if command == "serve":
        sections: dict[str, dict[str, str | int | Path]] = {
            "broker": {"host": "127.0.0.1", "port": port},
            "database": {"url": url},
        }
        config, ready = write_config(tmp_path / "mqttprov.toml", sections), "broker started"
    else:
        config, ready = write_authd_config(tmp_path / "authd.toml", url, port), "authd listening on"
    process, lines = await _started(command, config, tmp_path, ready)
    try:
        await proxy.set_mode("stall")  # a dead host: no error, no answer
        await eventually(polled(lambda: proxy.held), lambda held: held > 0, timeout=10)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), SHUTDOWN_DEADLINE)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    lines.extend(stderr.decode().splitlines())
    assert process.returncode == 0, "\n".join(lines)
    assert lines[-1].endswith(f"{'broker' if command == 'serve' else 'authd'} stopped"), "\n".join(lines)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
