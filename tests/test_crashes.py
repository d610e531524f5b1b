"""Crashes: ``mqttprov serve`` killed with SIGKILL mid-storm, then started again on the same database.

Nothing a device was told is lost (an ``ok`` reply always logs in afterwards), nothing is left
half-done (a device without a reply can enrol again; the database checks clean), and nobody is
left ``online`` by the dead process.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from provisioning.client import provision
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.migrate import upgrade
from tests.auth_support import PASSWORD, eventually, make_device
from tests.helpers import free_port, write_config
from tests.mqtt_clients import ACCEPTED, Client, login, request_provisioning
from tests.test_serve import ServeProcess, serving

# slow, the whole file: kills and restarts mqttprov serve processes.
pytestmark = pytest.mark.slow

STORM_DEVICES = 200
#: SIGKILL once this many devices have their ``ok``: well inside the storm, never before it.
KILL_AFTER_OK = 70
PRESENCE_DEVICES = 40
KILL_AFTER_LOGINS = 120
CLIENT_THREADS = 24
HOST = "127.0.0.1"
ONLINE, OFFLINE = DeviceStatus.ONLINE, DeviceStatus.OFFLINE


def config_file(tmp_path: Path, database_url: str, port: int) -> Path:
    """Cheap bcrypt, no per-address limit (every client is 127.0.0.1), a one-second cool-down."""
    return write_config(
        tmp_path / "mqttprov.toml",
        {
            "broker": {"host": HOST, "port": port},
            "database": {"url": database_url},
            "auth": {"bcrypt_cost": 4},
            "provisioning": {
                "address_burst": 100_000,
                "address_requests_per_minute": 1_000_000,
                "reissue_cooldown": 1,
            },
        },
    )


@asynccontextmanager
async def running(config: Path, cwd: Path) -> AsyncIterator[ServeProcess]:
    """``mqttprov serve`` with its stderr drained in the background (a full pipe would stall it)."""
    async with serving(config, cwd) as served:
        drain = asyncio.create_task(_drain(served), name="drain-serve-stderr")
        try:
            yield served
        finally:
            if served.process.returncode is None:
                served.process.kill()
            await served.process.wait()
            await drain


async def _drain(served: ServeProcess) -> None:
    assert served.process.stderr is not None
    while raw := await served.process.stderr.readline():
        served.lines.append(raw.decode().rstrip("\n"))


async def kill_when(served: ServeProcess, reached: asyncio.Event) -> None:
    """SIGKILL the broker as soon as ``reached`` is set (or fail if it never is)."""
    await asyncio.wait_for(reached.wait(), 60)
    served.process.kill()
    assert await served.process.wait() == -9


async def terminate(served: ServeProcess) -> int:
    """SIGTERM (a clean stop that writes pending presence) and the exit code."""
    served.process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(served.process.wait(), 20)


def threshold(loop: asyncio.AbstractEventLoop, count: int) -> tuple[Callable[[], None], asyncio.Event]:
    """A thread-safe tick counter that sets the returned event on the ``count``-th tick."""
    reached = asyncio.Event()
    lock = threading.Lock()
    ticks = [0]

    def tick() -> None:
        with lock:
            ticks[0] += 1
            if ticks[0] == count:
                loop.call_soon_threadsafe(reached.set)

    return tick, reached


async def check_database(database_url: str) -> list[Any]:
    """Integrity (SQLite: PRAGMA integrity_check) and every device row; returns the devices."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    registry = DeviceRegistry(create_engine(database_url))
    try:
        page = await registry.list_devices(limit=1000)
    finally:
        await registry.close()
    assert page.total == len(page.devices)
    assert len({d.mac for d in page.devices}) == page.total
    assert len({d.mqtt_username for d in page.devices}) == page.total
    return list(page.devices)


async def test_sigkill_mid_provisioning_storm_loses_no_credentials(tmp_path: Path, database_url: str) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    macs = [f"02:00:00:0e:{n >> 8:02x}:{n & 0xFF:02x}" for n in range(STORM_DEVICES)]
    loop = asyncio.get_running_loop()
    tick, reached = threshold(loop, KILL_AFTER_OK)

    def ask(mac: str) -> dict[str, Any] | None:
        try:
            body = request_provisioning(port, mac, {"mac": mac}, timeout=3)
        except (OSError, AssertionError):  # refused or cut off: the broker is dead
            return None
        if body is not None and body["status"] == "ok":
            tick()
        return body

    async with running(config, tmp_path) as served:
        killer = asyncio.create_task(kill_when(served, reached), name="killer")
        with ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="storm") as pool:
            bodies = await asyncio.gather(*(loop.run_in_executor(pool, ask, mac) for mac in macs))
        await killer
    got = {mac: b for mac, b in zip(macs, bodies, strict=True) if b is not None and b["status"] == "ok"}
    assert KILL_AFTER_OK <= len(got) < STORM_DEVICES, "the kill must land inside the storm"
    before_restart = await check_database(database_url)
    assert len(before_restart) >= len(got)

    async with running(config, tmp_path) as served:
        logins = await asyncio.to_thread(_in_threads, lambda b: login(port, b), list(got.values()))
        assert logins == [ACCEPTED] * len(got)
        rest = [mac for mac in macs if mac not in got]
        again = await asyncio.to_thread(_in_threads, lambda mac: provision(HOST, port, mac, timeout=5), rest)
        second = await asyncio.to_thread(_in_threads, lambda c: login(port, c.as_dict()), again)
        assert second == [ACCEPTED] * len(rest)
        # Every device logged in once and left: presence (written behind) says so.
        statuses = await _eventually(database_url, lambda found: {d.status for d in found} == {OFFLINE})
        assert await terminate(served) == 0
    assert {d.status for d in statuses} == {OFFLINE}
    devices = await check_database(database_url)
    assert len(devices) == STORM_DEVICES


async def test_sigkill_mid_presence_storm_leaves_nobody_online_after_restart(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    engine = create_engine(database_url)
    await upgrade(engine)
    registry = DeviceRegistry(engine)
    try:
        devices = [await make_device(registry, f"02:00:00:0f:00:{n:02x}") for n in range(PRESENCE_DEVICES)]
    finally:
        await registry.close()
    loop = asyncio.get_running_loop()
    tick, reached = threshold(loop, KILL_AFTER_LOGINS)
    stop = threading.Event()

    def come_and_go(username: str) -> int:
        """Log in and out (cleanly or by dropping the link) until the broker is gone."""
        logins = 0
        while not stop.is_set():
            client = Client(port, username, username=username, password=PASSWORD)
            try:
                if client.connect(timeout=5) != ACCEPTED:
                    break
            except (OSError, AssertionError):
                break
            finally:
                client.close()
            logins += 1
            tick()
        return logins

    async with running(config, tmp_path) as served:
        killer = asyncio.create_task(kill_when(served, reached), name="killer")
        with ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="presence") as pool:
            storm = [loop.run_in_executor(pool, come_and_go, d.mqtt_username) for d in devices]
            await killer
            stop.set()
            counts = await asyncio.gather(*storm)
    assert sum(counts) >= KILL_AFTER_LOGINS
    await check_database(database_url)

    async with running(config, tmp_path) as served:
        after = await check_database(database_url)
        assert [d for d in after if d.status is ONLINE] == []
        assert {d.status for d in after} <= {OFFLINE, DeviceStatus.REGISTERED}
        # And presence still works on the restarted broker.
        first = devices[0]
        client = Client(port, first.mqtt_username, username=first.mqtt_username, password=PASSWORD)
        try:
            assert await asyncio.to_thread(client.connect) == ACCEPTED
            found = await _eventually(
                database_url, lambda now: any(d.id == first.id and d.status is ONLINE for d in now)
            )
        finally:
            await asyncio.to_thread(client.close)
        assert [d.status for d in found if d.id == first.id] == [ONLINE]
        assert await terminate(served) == 0


async def _eventually(database_url: str, done: Callable[[list[DeviceInfo]], bool]) -> list[DeviceInfo]:
    """Presence is written behind (batches every 0.5 s): re-read the devices until ``done``."""
    registry = DeviceRegistry(create_engine(database_url))
    try:
        page = await eventually(lambda: registry.list_devices(limit=1000), lambda p: done(list(p.devices)))
    finally:
        await registry.close()
    return list(page.devices)


def _in_threads(work: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="after-crash") as pool:
        return list(pool.map(work, items))
