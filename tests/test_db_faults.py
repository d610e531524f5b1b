"""Database faults under the change-feed follower: it survives a failure at each of its awaits,
never skips a change, is restarted if it dies anyway, tells one story per outage, and the cache
stops vouching for logins once the feed has not been read for a while.

Faults are injected by making one repository call fail as the driver's would (translated to
:class:`RegistryUnavailableError`); the outages through a real connection are in
``test_db_faults_postgres.py``. Changes are made through a second engine, as the CLI would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from auth_plugin.authenticator import ConnectAttempt
from auth_plugin.cache import VerifiedCache
from auth_plugin.presence import PresenceRecorder
from auth_plugin.principals import Principal
from auth_plugin.revocation import Revoker
from broker.core import AuthCore, Supervised, auth_core
from broker.external.mosquitto.bridge import BridgeFollower, DynsecBridge
from broker.external.mosquitto.dynsec import DynsecError
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.migrate import upgrade
from provisioning.registry.outage import OutageLog
from provisioning.registry.presence import PresenceStore
from tests.auth_support import ACCOUNT_PASSWORD, PASSWORD, eventually, make_account, make_device, polled
from tests.helpers import broker_settings
from tests.test_revocation import Sessions

Call = Callable[..., Awaitable[Any]]


class Fault:
    """Makes one repository method fail ``times`` times, as if the database were gone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str, times: int = 2) -> None:
        real: Call = getattr(owner, name)
        self.left = times
        self.spent = asyncio.Event()

        async def failing(*args: Any, **kwargs: Any) -> Any:
            if self.left > 0:
                self.left -= 1
                if self.left == 0:
                    self.spent.set()
                raise RegistryUnavailableError("database unavailable: injected fault")
            return await real(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)


@dataclass
class Broker:
    """One broker process as the follower sees it (a core, a live-session table, a follower)
    and the CLI's own engine on the same database."""

    core: AuthCore
    cli: DeviceRegistry
    cli_accounts: AccountRegistry
    sessions: Sessions
    revoker: Revoker

    async def login(
        self, username: str, password: str = PASSWORD, client_id: str | None = None
    ) -> Principal | None:
        """A CONNECT answered by this broker; a live session when accepted."""
        client_id = client_id or username
        attempt = ConnectAttempt(client_id, username, password)
        principal = (await self.core.authenticator.authenticate(attempt)).principal
        if principal is not None:
            self.sessions.live[client_id] = principal
        return principal

    async def kicked(self, client_id: str) -> None:
        """Wait until the follower throws ``client_id`` off."""
        while await asyncio.wait_for(self.sessions.kicked.get(), 10) != client_id:
            pass


@pytest.fixture
async def broker(sqlite_url: str) -> AsyncIterator[Broker]:
    core = auth_core(broker_settings(sqlite_url))
    cli_engine = create_engine(sqlite_url)
    await upgrade(cli_engine)
    sessions = Sessions()
    revoker = Revoker(core.registry, core.accounts, core.authenticator.cache, sessions, interval=0.05)
    try:
        yield Broker(core, DeviceRegistry(cli_engine), AccountRegistry(cli_engine), sessions, revoker)
    finally:
        await core.close()
        await cli_engine.dispose()


async def _live_device(broker: Broker, mac: str) -> DeviceInfo:
    device = await make_device(broker.cli, mac)
    assert await broker.login(device.mqtt_username) is not None
    return device


async def _decommissioned_and_refused(broker: Broker, device: DeviceInfo) -> None:
    """A decommission by the CLI throws the live session off, and the next login is refused."""
    await broker.cli.decommission(device.id)
    await broker.kicked(device.mqtt_username)
    assert await broker.login(device.mqtt_username) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("owner", "method"),
    [
        ("registry", "last_change_id"),
        ("registry", "changes_since"),
        ("registry", "find_credentials_by_username"),
        ("accounts", "find"),
    ],
)
async def test_the_follower_survives_the_database_failing_at_each_await_and_applies_later_changes(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, owner: str, method: str
) -> None:
    caplog.set_level(logging.INFO)
    first = await _live_device(broker, "02:00:00:00:0f:01")
    later = await _live_device(broker, "02:00:00:00:0f:02")
    await make_account(broker.cli_accounts, "ops", ["subscribe devices/#"])
    assert await broker.login("ops", ACCOUNT_PASSWORD, "ops-1") is not None
    fault = Fault(monkeypatch, getattr(broker.core, owner), method)
    follower = Supervised("test-follower", broker.revoker).start()
    # The change whose application meets the fault (none for the start's read): retried, not
    # skipped, so its session is thrown off once the database answers again.
    if method == "find":
        await broker.cli_accounts.remove("ops")
        await broker.kicked("ops-1")
    elif method == "last_change_id":
        await eventually(polled(lambda: broker.revoker.position), lambda position: position is not None)
    else:
        await broker.cli.decommission(first.id)
        await broker.kicked(first.mqtt_username)
    assert fault.spent.is_set()
    await _decommissioned_and_refused(broker, later)
    await follower.stop()

    assert follower.restarts == 0  # survived by itself: nothing died
    outage = [r for r in caplog.records if "database" in r.getMessage()]
    assert [r.levelname for r in outage] == ["WARNING", "INFO"]
    assert "database unavailable (change feed" in outage[0].getMessage()
    assert outage[1].getMessage().startswith("database recovered after")
    assert all(r.exc_info is None for r in outage)  # routine: no traceback


async def test_a_session_whose_recheck_failed_is_checked_again_by_the_next_round(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = await _live_device(broker, "02:00:00:00:0f:03")
    principal = broker.sessions.live[device.mqtt_username]
    await broker.cli.decommission(device.id)
    broker.core.authenticator.cache.drop(device.mqtt_username)  # as the follower would have
    fault = Fault(monkeypatch, broker.core.registry, "find_credentials_by_username", times=1)

    broker.revoker.confirm(device.mqtt_username, principal)
    await asyncio.wait_for(fault.spent.wait(), 10)
    follower = Supervised("test-follower", broker.revoker).start()
    await broker.kicked(device.mqtt_username)
    await follower.stop()


class _BugError(Exception):
    """A bug in a dependency: not a database failure."""


async def test_a_follower_that_dies_anyway_is_logged_with_its_traceback_and_restarted(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("broker.core.RESTART_BACKOFF", 0.01)
    first = await _live_device(broker, "02:00:00:00:0f:04")
    later = await _live_device(broker, "02:00:00:00:0f:05")
    real_kick = broker.sessions.kick
    bugs = [_BugError("kick failed")]

    async def kick(client_id: str, reason: str) -> bool:
        if bugs:
            raise bugs.pop()
        return await real_kick(client_id, reason)

    monkeypatch.setattr(broker.sessions, "kick", kick)
    follower = Supervised("test-follower", broker.revoker).start()
    await broker.cli.decommission(first.id)
    await broker.kicked(first.mqtt_username)  # the change is applied again after the restart
    await _decommissioned_and_refused(broker, later)
    await follower.stop()

    assert follower.restarts == 1
    died = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(died) == 1
    assert "test-follower died; restarting it" in died[0].getMessage()
    assert died[0].exc_info is not None
    assert died[0].exc_info[0] is _BugError


async def test_the_cache_stops_vouching_for_logins_while_the_feed_cannot_be_read(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = await _live_device(broker, "02:00:00:00:0f:06")
    username = device.mqtt_username
    cache = broker.core.authenticator.cache
    monkeypatch.setattr(broker.revoker, "trust_window", 0.3)
    follower = Supervised("test-follower", broker.revoker).start()
    assert await broker.login(username) is not None
    assert cache.principal(username, PASSWORD) is not None  # warm: no registry read

    # Cut off from the feed (the CLI is not): a decommission meanwhile is not seen here.
    fault = Fault(monkeypatch, broker.core.registry, "changes_since", times=10**9)
    await broker.cli.decommission(device.id)
    assert not await eventually(polled(lambda: cache.fresh), lambda fresh: not fresh)

    assert cache.principal(username, PASSWORD) is None
    assert await broker.login(username) is None  # the login read the registry
    fault.left = 0
    await broker.kicked(username)
    await follower.stop()


def test_a_bound_cache_answers_principals_only_within_the_window_after_the_last_read() -> None:
    now = [100.0]
    cache = VerifiedCache(clock=lambda: now[0])
    principal: Principal = object()  # type: ignore[assignment]
    cache.remember("u", "tag", "pw")
    cache.accept("u", "tag", principal)
    now[0] += 3600
    assert cache.principal("u", "pw") is principal  # unbound: only this process changes it

    cache.bind_to_feed(2.0)
    now[0] += 1.9
    assert cache.principal("u", "pw") is principal
    now[0] += 0.2
    assert cache.principal("u", "pw") is None
    assert cache.verified("u", "tag", "pw")  # the tag comes from a fresh registry read
    cache.bind_to_feed(2.0)  # a restarted follower: no trust until it reads the feed
    assert cache.principal("u", "pw") is None
    cache.feed_read()
    assert cache.principal("u", "pw") is principal


def test_an_outage_is_one_warning_counted_repeats_and_one_recovered_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    now = [0.0]
    outage = OutageLog(logging.getLogger("test.outage"), repeat_every=60, clock=lambda: now[0])
    exc = RegistryUnavailableError("database unavailable: [Errno 111] Connect call failed\nmore")
    for _ in range(120):  # a failure every 0.5 s for a minute
        outage.failed("change feed: revocations wait", exc)
        now[0] += 0.5
    outage.failed("presence: status waits", exc)
    now[0] += 1.5
    outage.succeeded()
    outage.succeeded()

    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    error = "database unavailable: [Errno 111] Connect call failed"
    assert lines == [
        ("WARNING", f"database unavailable (change feed: revocations wait): {error}"),
        (
            "WARNING",
            f"database still unavailable after 60 s: 121 failures (change feed, presence); last: {error}",
        ),
        ("INFO", "database recovered after 61.5 s (121 failures)"),
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert not outage.down
    assert outage.outages == 1


class _Dynsec:
    """Mosquitto's dynamic-security plugin as the bridge's revocations use it; fails on demand."""

    def __init__(self) -> None:
        self.deleted: asyncio.Queue[str] = asyncio.Queue()
        self.failures = 0

    async def delete_client(self, username: str) -> None:
        if self.failures:
            self.failures -= 1
            raise DynsecError("deleteClient", "timed out")
        self.deleted.put_nowait(username)

    async def delete_role(self, rolename: str) -> None:
        raise DynsecError("deleteRole", "Role not found")


async def test_the_bridge_follower_rides_out_the_database_and_mosquitto_and_applies_every_change(
    broker: Broker, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    dynsec = _Dynsec()
    core = broker.core
    bridge = DynsecBridge(
        dynsec,  # type: ignore[arg-type]
        broker_settings(sqlite_url),
        devices=core.registry,
        accounts=core.accounts,
        interval=0.05,
    )
    first = await make_device(broker.cli, "02:00:00:00:0f:07")
    later = await make_device(broker.cli, "02:00:00:00:0f:08")
    fault = Fault(monkeypatch, core.registry, "find_credentials_by_username")
    follower = Supervised("test-bridge", BridgeFollower(bridge, since=await core.registry.last_change_id()))
    follower.start()
    dynsec.failures = 2  # then Mosquitto, once the database answers
    await broker.cli.decommission(first.id)
    assert await asyncio.wait_for(dynsec.deleted.get(), 10) == first.mqtt_username
    await broker.cli.decommission(later.id)
    assert await asyncio.wait_for(dynsec.deleted.get(), 10) == later.mqtt_username
    await follower.stop()

    assert fault.spent.is_set()
    assert follower.restarts == 0
    lines = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name == "broker.external.mosquitto.bridge"
    ]
    story = [(level, " ".join(m.split()[:2])) for level, m in lines if "unavailable" in m or "recovered" in m]
    assert story == [
        ("WARNING", "database unavailable"),
        ("INFO", "database recovered"),
        ("WARNING", "Mosquitto unavailable"),
        ("INFO", "Mosquitto recovered"),
    ]


async def test_the_presence_writer_keeps_its_batch_through_an_outage_and_tells_it_once(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    device = await make_device(broker.cli, "02:00:00:00:0f:09")
    store = PresenceStore(broker.core.registry.engine)
    fault = Fault(monkeypatch, store, "record", times=5)
    recorder = PresenceRecorder(store, interval=0.01)
    recorder.online(device.id)
    writer = Supervised("test-presence", recorder).start()
    await asyncio.wait_for(fault.spent.wait(), 10)
    await eventually(polled(lambda: recorder.batches_written), lambda written: written == 1)
    await writer.stop()

    assert (await broker.cli.get(device.id)).status is DeviceStatus.ONLINE
    story = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "auth_plugin.presence"]
    assert [level for level, _ in story] == ["WARNING", "INFO"]
    assert story[0][1].startswith("database unavailable (presence")
    assert story[1][1].startswith("database recovered after")
    assert story[1][1].endswith("(5 failures)")
