"""Logins against a real broker on a free loopback port: the CONNACK matrix, the verified-credential
cache, bcrypt off the event loop, revocation from another process, failed-login throttling, presence.

Clients are paho-mqtt 2.x (:class:`tests.mqtt_clients.Client`) or raw sockets, always called from
threads: the broker runs on the test's own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from auth_plugin.authenticator import ConnectAttempt
from auth_plugin.throttle import LoginThrottle, ThrottlePolicy
from broker.core import auth_core
from broker.embedded import BrokerServer
from config import Settings
from provisioning.passwords import PasswordHasher
from provisioning.registry import ACTIVE_STATUSES, DeviceInfo, DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.migrate import upgrade
from tests.auth_support import (
    ACCOUNT_PASSWORD,
    PASSWORD,
    RawSession,
    eventually,
    hashed,
    login_code,
    make_account,
    make_device,
    settings,
    stored_hash,
)
from tests.helpers import run_mqttprov, write_config
from tests.mqtt_clients import Client

ACCEPTED, BAD_CREDENTIALS, NOT_AUTHORIZED = 0, 4, 5
#: Exactly 72 bytes: all bcrypt looks at, and the longest password the broker accepts.
LONG_PASSWORD = ("long-password-" * 6)[:72]
#: How soon a change made by another process must end a live session (the acceptance criterion).
REVOCATION_DEADLINE = 2.0


@pytest.fixture
async def server(sqlite_url: str) -> AsyncIterator[BrokerServer]:
    # Refusals from 127.0.0.1 add up across a test: keep the throttle's delay out of the runtime.
    async with BrokerServer(settings(sqlite_url, max_refusal_delay=0.01)) as running:
        yield running


def port_of(server: BrokerServer) -> int:
    return server.settings.broker.port


# -- 1. the login matrix ---------------------------------------------------------------------------

# {name} stands for the username of that fixture principal (see ``principals`` below).
# case: (client id, username, password, CONNACK code)
LOGINS: dict[str, tuple[str, str | None, str | None, int]] = {
    "device, right password": ("{ok}", "{ok}", PASSWORD, ACCEPTED),
    "device, wrong password": ("{ok}", "{ok}", "wrong-password", BAD_CREDENTIALS),
    "device, empty password": ("{ok}", "{ok}", "", BAD_CREDENTIALS),
    "device, no password": ("{ok}", "{ok}", None, BAD_CREDENTIALS),
    "unknown device username": ("device_000000000000", "device_000000000000", PASSWORD, BAD_CREDENTIALS),
    "device, client id not its username": ("somebody-else", "{ok}", PASSWORD, NOT_AUTHORIZED),
    "device, another device's client id": ("{pending}", "{ok}", PASSWORD, NOT_AUTHORIZED),
    "decommissioned device": ("{decommissioned}", "{decommissioned}", PASSWORD, BAD_CREDENTIALS),
    "reset device, old password": ("{reset}", "{reset}", PASSWORD, BAD_CREDENTIALS),
    "pending device, no credentials": ("{pending}", "{pending}", PASSWORD, BAD_CREDENTIALS),
    "approved device, no credentials": ("{approved}", "{approved}", PASSWORD, BAD_CREDENTIALS),
    "account, client id NAME": ("backend", "backend", ACCOUNT_PASSWORD, ACCEPTED),
    "account, client id NAME-worker1": ("backend-worker1", "backend", ACCOUNT_PASSWORD, ACCEPTED),
    "account, client id neither": ("worker1", "backend", ACCOUNT_PASSWORD, NOT_AUTHORIZED),
    "account, client id NAME without the dash": ("backendx", "backend", ACCOUNT_PASSWORD, NOT_AUTHORIZED),
    "account, wrong password": ("backend", "backend", "wrong-password", BAD_CREDENTIALS),
    "account password for a device": ("{ok}", "{ok}", ACCOUNT_PASSWORD, BAD_CREDENTIALS),
    "no username, client id not a MAC": ("not-a-mac", None, None, NOT_AUTHORIZED),
    "no username, empty client id": ("", None, None, NOT_AUTHORIZED),
    "no username, client id a MAC (provisioning)": ("02:00:00:00:01:99", None, None, ACCEPTED),
}


@pytest.fixture
async def principals(server: BrokerServer) -> dict[str, str]:
    """One principal of every kind the matrix needs; name -> username."""
    registry = server.registry
    ok = await make_device(registry, "02:00:00:00:01:01")
    decommissioned = await make_device(registry, "02:00:00:00:01:02")
    await registry.decommission(decommissioned.id)
    reset = await make_device(registry, "02:00:00:00:01:03")
    await registry.reset(reset.id)
    pending = await registry.create_device("02:00:00:00:01:04", status=DeviceStatus.PENDING)
    approved = await registry.add_allowed("02:00:00:00:01:05")
    await make_account(server.accounts, "backend", ["subscribe devices/+/telemetry"])
    found = {"ok": ok, "decommissioned": decommissioned, "reset": reset, "pending": pending}
    return {name: d.mqtt_username for name, d in (found | {"approved": approved}).items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LOGINS))
async def test_login_matrix(server: BrokerServer, principals: dict[str, str], case: str) -> None:
    client_id, username, password, expected = LOGINS[case]
    code = await asyncio.to_thread(
        login_code,
        port_of(server),
        client_id.format(**principals),
        username=None if username is None else username.format(**principals),
        password=password,
    )
    assert code == expected


async def test_unusable_passwords_are_refused_cleanly_and_the_broker_keeps_serving(
    server: BrokerServer,
) -> None:
    assert len(LONG_PASSWORD.encode()) == 72
    device = await make_device(server.registry, "02:00:00:00:01:10", LONG_PASSWORD)
    user = device.mqtt_username
    unusable = [
        LONG_PASSWORD + "x",  # bcrypt alone would ignore the 73rd byte and accept it
        LONG_PASSWORD + "\N{EURO SIGN}",
        "p" * 10_000,
        "\x00",
        LONG_PASSWORD[:20] + "\x00" + LONG_PASSWORD[21:],
    ]
    for password in unusable:
        code = await asyncio.to_thread(login_code, port_of(server), user, username=user, password=password)
        assert code == BAD_CREDENTIALS, repr(password[:30])
    code = await asyncio.to_thread(login_code, port_of(server), user, username=user, password=LONG_PASSWORD)
    assert code == ACCEPTED


HOSTILE_USERNAMES = [
    "' OR 1=1 --",
    "device_' OR '1'='1",
    "device_%",
    "#",
    "+/x",
    "devices/+/telemetry",
    "$SYS",
    "provision",
    "device_",
    "\N{PILE OF POO}" * 20,
]


async def test_hostile_usernames_are_refused_cleanly(server: BrokerServer) -> None:
    device = await make_device(server.registry, "02:00:00:00:01:11")
    port = port_of(server)
    codes = {
        name: await asyncio.to_thread(login_code, port, "client-" + str(i), username=name, password=PASSWORD)
        for i, name in enumerate(HOSTILE_USERNAMES)
    }
    assert codes == dict.fromkeys(HOSTILE_USERNAMES, BAD_CREDENTIALS)
    user = device.mqtt_username
    assert await asyncio.to_thread(login_code, port, user, username=user, password=PASSWORD) == ACCEPTED
    assert list(server.broker.sessions) == [user]


# -- 2. the verified-credential cache --------------------------------------------------------------


async def test_reconnects_cost_no_bcrypt_until_the_device_gets_new_credentials(server: BrokerServer) -> None:
    device = await make_device(server.registry, "02:00:00:00:02:01")
    user, port = device.mqtt_username, port_of(server)
    stats = server.services.authenticator.stats

    async def login(password: str) -> int:
        return await asyncio.to_thread(login_code, port, user, username=user, password=password)

    checks, hits = stats.bcrypt_checks, stats.cache_hits
    assert await login(PASSWORD) == ACCEPTED
    assert stats.bcrypt_checks == checks + 1
    for _ in range(10):
        assert await login(PASSWORD) == ACCEPTED
    assert (stats.bcrypt_checks, stats.cache_hits) == (checks + 1, hits + 10)

    new_password = "the-new-password-after-reissue-0003"
    await server.registry.issue_credentials(
        device.id,
        hashed(new_password),
        expected_hash=await stored_hash(server, device),
        allowed_from=set(ACTIVE_STATUSES),
        kind="reissued",
    )
    assert await login(PASSWORD) == BAD_CREDENTIALS
    checks = stats.bcrypt_checks
    assert await login(new_password) == ACCEPTED
    assert stats.bcrypt_checks == checks + 1
    assert await login(new_password) == ACCEPTED
    assert stats.bcrypt_checks == checks + 1


async def test_a_rotated_account_password_is_refused_and_the_new_one_costs_one_check(
    server: BrokerServer,
) -> None:
    await make_account(server.accounts, "backend", ["subscribe devices/+/telemetry"])
    port = port_of(server)
    stats = server.services.authenticator.stats

    async def login(password: str) -> int:
        return await asyncio.to_thread(login_code, port, "backend", username="backend", password=password)

    assert await login(ACCOUNT_PASSWORD) == ACCEPTED
    checks = stats.bcrypt_checks
    for _ in range(10):
        assert await login(ACCOUNT_PASSWORD) == ACCEPTED
    assert stats.bcrypt_checks == checks

    await server.accounts.rotate("backend", hashed("rotated-account-password-0004"))
    assert await login(ACCOUNT_PASSWORD) == BAD_CREDENTIALS
    checks = stats.bcrypt_checks
    assert await login("rotated-account-password-0004") == ACCEPTED
    assert stats.bcrypt_checks == checks + 1


# -- 3. bcrypt runs off the event loop -------------------------------------------------------------


@dataclass(frozen=True)
class PingSample:
    """The bcrypt queue just before a PINGREQ and just after its PINGRESP."""

    pending_before: int
    pending_after: int
    finished_before: int
    finished_after: int


def _finished(hasher: PasswordHasher) -> int:
    return hasher.operations - hasher.pending


def ping_until_done(
    pinger: RawSession, hasher: PasswordHasher, logins: list[Future[int]]
) -> list[PingSample]:
    """PINGREQ/PINGRESP round trips, back to back, until every login has its answer."""
    samples: list[PingSample] = []
    deadline = time.monotonic() + 60
    while not all(login.done() for login in logins) and time.monotonic() < deadline:
        pending, finished = hasher.pending, _finished(hasher)
        pinger.ping()
        samples.append(PingSample(pending, hasher.pending, finished, _finished(hasher)))
    return samples


@pytest.mark.slow
async def test_the_loop_answers_pings_while_twenty_logins_wait_for_bcrypt(sqlite_url: str) -> None:
    config = settings(sqlite_url, broker={"connect_timeout": 60}, bcrypt_cost=10, bcrypt_workers=1)
    slow_hash = await asyncio.to_thread(hashed, PASSWORD, 10)
    async with BrokerServer(config) as server:
        port, hasher = port_of(server), server.hasher
        devices = [
            await make_device(server.registry, f"02:00:00:00:03:{i:02x}", password_hash=slow_hash)
            for i in range(20)
        ]
        watcher = await make_device(server.registry, "02:00:00:00:03:ff")  # cost 4: logs in at once
        stats = server.services.authenticator.stats
        with RawSession(port) as pinger, ThreadPoolExecutor(max_workers=21) as pool:
            user = watcher.mqtt_username
            assert await asyncio.to_thread(pinger.connect, user, username=user, password=PASSWORD) == 0
            checks = stats.bcrypt_checks
            logins = [
                pool.submit(
                    login_code, port, d.mqtt_username, username=d.mqtt_username, password=PASSWORD, timeout=60
                )
                for d in devices
            ]
            samples = await asyncio.wrap_future(pool.submit(ping_until_done, pinger, hasher, logins))
            codes = [await asyncio.wrap_future(login) for login in logins]

    # A PINGRESP came back while checks were queued on both sides of the round trip and none of
    # them finished in between: the loop answered while a worker thread was inside bcrypt.
    during_a_check = [
        s
        for s in samples
        if s.pending_before > 0 and s.pending_after > 0 and s.finished_before == s.finished_after
    ]
    assert during_a_check, f"no PINGRESP while bcrypt was running ({len(samples)} pings)"
    assert codes == [ACCEPTED] * 20
    assert stats.bcrypt_checks == checks + 20


# -- 4. revocation from another process ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["decommission", "reset"])
async def test_a_cli_change_in_another_process_disconnects_the_device(
    database_url: str, tmp_path: Path, command: str
) -> None:
    config = write_config(tmp_path / "mqttprov.toml", {"database": {"url": database_url}})
    async with BrokerServer(settings(database_url)) as server:
        device = await make_device(server.registry, "02:00:00:00:04:01")
        user, port = device.mqtt_username, port_of(server)
        client = Client(port, user, username=user, password=PASSWORD)
        try:
            assert await asyncio.to_thread(client.connect) == ACCEPTED
            done = await asyncio.to_thread(
                run_mqttprov, "devices", command, str(device.id), "--config", str(config), cwd=tmp_path
            )
            assert done.returncode == 0, done.stderr
            assert await asyncio.to_thread(client.disconnected.wait, REVOCATION_DEADLINE)
        finally:
            await asyncio.to_thread(client.close)
        code = await asyncio.to_thread(login_code, port, user, username=user, password=PASSWORD)
        assert code == BAD_CREDENTIALS


@pytest.mark.slow
@pytest.mark.parametrize("change", ["rotate", "remove"])
async def test_an_account_change_in_another_process_disconnects_its_sessions(
    database_url: str, change: str
) -> None:
    # `mqttprov accounts` is not registered on the CLI yet: another engine stands for the
    # other process (same database, its own connection pool, no shared memory).
    async with BrokerServer(settings(database_url)) as server:
        await make_account(server.accounts, "backend", ["subscribe devices/+/telemetry"])
        port = port_of(server)
        clients = [
            Client(port, client_id, username="backend", password=ACCOUNT_PASSWORD)
            for client_id in ("backend", "backend-worker1")
        ]
        try:
            for client in clients:
                assert await asyncio.to_thread(client.connect) == ACCEPTED
            other_process = AccountRegistry(create_engine(database_url))
            try:
                if change == "rotate":
                    await other_process.rotate("backend", hashed("rotated-account-password-0004"))
                else:
                    await other_process.remove("backend")
            finally:
                await other_process.close()
            for client in clients:
                assert await asyncio.to_thread(client.disconnected.wait, REVOCATION_DEADLINE)
        finally:
            for client in clients:
                await asyncio.to_thread(client.close)
        code = await asyncio.to_thread(
            login_code, port, "backend", username="backend", password=ACCOUNT_PASSWORD
        )
        assert code == BAD_CREDENTIALS


# -- 5. failed-login throttling --------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_throttle(clock: FakeClock, policy: ThrottlePolicy, *, max_keys: int = 100_000) -> LoginThrottle:
    return LoginThrottle(policy, max_keys=max_keys, clock=clock)


def test_refusals_slow_down_past_throttle_after_up_to_max_delay() -> None:
    throttle = make_throttle(FakeClock(), ThrottlePolicy(throttle_after=3, lockout_after=100, max_delay=0.3))
    delays = [throttle.failed("device_0123456789ab", "192.0.2.1") for _ in range(9)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert 0.0 < delays[3] < delays[4] < delays[5] <= 0.3
    assert max(delays) == 0.3
    assert delays[-2:] == [0.3, 0.3]


def test_lockout_is_per_username_and_address_and_expires() -> None:
    clock = FakeClock()
    throttle = make_throttle(clock, ThrottlePolicy(throttle_after=100, lockout_after=3, lockout_seconds=60))
    user, address = "device_0123456789ab", "192.0.2.1"
    for _ in range(2):
        throttle.failed(user, address)
    assert not throttle.locked(user, address)
    throttle.failed(user, address)
    assert throttle.locked(user, address)
    assert not throttle.locked(user, "192.0.2.2")  # the real device behind another address
    assert not throttle.locked("device_ba9876543210", address)
    clock.now += 59.9
    assert throttle.locked(user, address)
    clock.now += 0.1
    assert not throttle.locked(user, address)


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = FakeClock()
    throttle = make_throttle(clock, ThrottlePolicy(throttle_after=1, lockout_after=2, window=60))
    user, address = "device_0123456789ab", "192.0.2.1"
    throttle.failed(user, address)
    clock.now += 61
    assert throttle.failed(user, address) == 0.0
    assert not throttle.locked(user, address)


def test_a_success_clears_the_pair() -> None:
    throttle = make_throttle(FakeClock(), ThrottlePolicy(throttle_after=100, lockout_after=3))
    user, address = "device_0123456789ab", "192.0.2.1"
    throttle.failed(user, address)
    throttle.failed(user, address)
    throttle.succeeded(user, address)
    throttle.failed(user, address)
    throttle.failed(user, address)
    assert not throttle.locked(user, address)
    throttle.failed(user, address)
    assert throttle.locked(user, address)


def test_throttle_memory_is_bounded_by_max_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="auth_plugin.throttle")  # one warning per lockout
    clock = FakeClock()
    throttle = make_throttle(
        clock, ThrottlePolicy(throttle_after=1, lockout_after=1, lockout_seconds=600), max_keys=50
    )
    for i in range(5000):
        throttle.failed(f"device_{i:012x}", f"10.0.{i // 256}.{i % 256}")
        clock.now += 0.01
    # Private state on purpose: the bound on memory is the behaviour under test.
    assert len(throttle._failures) <= 50
    assert len(throttle._locked_until) <= 50
    assert throttle.locked(f"device_{4999:012x}", "10.0.19.135")  # the newest lockout holds


async def test_a_locked_out_address_is_refused_without_a_check_while_another_address_logs_in(
    sqlite_url: str,
) -> None:
    config = settings(sqlite_url, throttle_after=2, lockout_after=3, max_refusal_delay=0.01)
    async with BrokerServer(config) as server:
        device = await make_device(server.registry, "02:00:00:00:05:01")
        user, port = device.mqtt_username, port_of(server)
        stats = server.services.authenticator.stats

        async def login(password: str, source: str) -> int:
            return await asyncio.to_thread(
                login_code, port, user, username=user, password=password, source=source
            )

        for _ in range(3):
            assert await login("wrong-password", "127.0.0.1") == BAD_CREDENTIALS
        checks = stats.bcrypt_checks
        assert await login(PASSWORD, "127.0.0.1") == NOT_AUTHORIZED
        assert stats.bcrypt_checks == checks
        assert await login(PASSWORD, "127.0.0.2") == ACCEPTED
        assert stats.bcrypt_checks == checks + 1

        events = await eventually(
            lambda: server.registry.events(device.id),
            lambda found: any(e.kind == "login_refused" and e.count >= 3 for e in found),
        )
    refused = [e for e in events if e.kind == "login_refused"]
    assert [(e.count, e.detail) for e in refused] == [(3, {"reason": "wrong password"})]


# -- 7. presence -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_presence_follows_a_device_online_and_offline(database_url: str) -> None:
    async with BrokerServer(settings(database_url)) as server:
        device = await make_device(server.registry, "02:00:00:00:07:01")
        user = device.mqtt_username
        presence = server.services.presence
        client = Client(port_of(server), user, username=user, password=PASSWORD)
        try:
            assert await asyncio.to_thread(client.connect) == ACCEPTED
            # The broker runs its connect hooks before it handles any packet: a SUBACK means done.
            assert await asyncio.to_thread(client.subscribe, f"devices/{device.id}/#") == 1
            await presence.flush()
            online = await server.registry.get(device.id)
        finally:
            await asyncio.to_thread(client.close)

        async def read() -> DeviceInfo:
            await presence.flush()
            return await server.registry.get(device.id)

        offline = await eventually(read, lambda info: info.status is DeviceStatus.OFFLINE)
    assert online.status is DeviceStatus.ONLINE
    assert online.activated_at is not None
    assert online.last_seen_at is not None
    assert offline.status is DeviceStatus.OFFLINE
    assert offline.last_seen_at is not None
    assert offline.last_seen_at >= online.last_seen_at


@pytest.mark.slow
async def test_a_take_over_leaves_the_device_online(database_url: str) -> None:
    # The old connection's end is recorded before the new one goes live, never after it.
    async with BrokerServer(settings(database_url)) as server:
        device = await make_device(server.registry, "02:00:00:00:07:03")
        user = device.mqtt_username
        first = Client(port_of(server), user, username=user, password=PASSWORD)
        second = Client(port_of(server), user, username=user, password=PASSWORD)
        try:
            assert await asyncio.to_thread(first.connect) == ACCEPTED
            assert await asyncio.to_thread(second.connect) == ACCEPTED
            assert await asyncio.to_thread(second.subscribe, f"devices/{device.id}/#") == 1
            await server.services.presence.flush()
            found = await server.registry.get(device.id)
        finally:
            await asyncio.to_thread(first.close)
            await asyncio.to_thread(second.close)
    assert found.status is DeviceStatus.ONLINE


@pytest.mark.slow
async def test_devices_connected_at_shutdown_are_left_offline(database_url: str) -> None:
    async with BrokerServer(settings(database_url)) as server:
        device = await make_device(server.registry, "02:00:00:00:07:04")
        user = device.mqtt_username
        client = Client(port_of(server), user, username=user, password=PASSWORD)
        try:
            assert await asyncio.to_thread(client.connect) == ACCEPTED
            assert await asyncio.to_thread(client.subscribe, f"devices/{device.id}/#") == 1
            await server.services.presence.flush()
            online = await server.registry.get(device.id)
            await server.stop()  # with the device still connected
        finally:
            await asyncio.to_thread(client.close)
    registry = DeviceRegistry(create_engine(database_url))
    try:
        after = await registry.get(device.id)
    finally:
        await registry.close()
    assert online.status is DeviceStatus.ONLINE
    assert after.status is DeviceStatus.OFFLINE


@pytest.mark.slow
async def test_a_refusal_recorded_in_the_background_is_written_before_the_core_closes(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    registry = DeviceRegistry(engine)
    try:
        device = await make_device(registry, "02:00:00:00:07:05")
    finally:
        await registry.close()
    core = auth_core(settings(database_url))
    user = device.mqtt_username
    decision = await core.authenticator.authenticate(
        ConnectAttempt(client_id=user, username=user, password="wrong-password", address="127.0.0.1")
    )
    await core.close()  # at once: the login_refused event is still being written

    registry = DeviceRegistry(create_engine(database_url))
    try:
        events = await registry.events(device.id)
    finally:
        await registry.close()
    assert not decision.accepted
    assert [(e.kind, e.count) for e in events if e.kind == "login_refused"] == [("login_refused", 1)]


@pytest.mark.slow
async def test_thirty_logins_are_written_in_a_couple_of_batches(database_url: str) -> None:
    async with BrokerServer(settings(database_url)) as server:
        devices = [await make_device(server.registry, f"02:00:00:00:07:{i:02x}") for i in range(16, 46)]
        presence, port = server.services.presence, port_of(server)
        await presence.flush()  # whatever start-up left behind is not part of the count
        before, started = presence.batches_written, time.monotonic()
        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            sessions = [RawSession(port) for _ in devices]
            try:
                codes = list(
                    await asyncio.gather(
                        *(
                            asyncio.wrap_future(
                                pool.submit(
                                    s.connect, d.mqtt_username, username=d.mqtt_username, password=PASSWORD
                                )
                            )
                            for s, d in zip(sessions, devices, strict=True)
                        )
                    )
                )
                page = await eventually(
                    lambda: server.registry.list_devices(status=DeviceStatus.ONLINE),
                    lambda found: found.total == len(devices),
                    timeout=3.0,
                )
                elapsed = time.monotonic() - started
            finally:
                for session in sessions:
                    session.close()
    assert codes == [ACCEPTED] * len(devices)
    assert page.total == len(devices)
    # Written behind at most once per interval, however the logins spread out in time: thirty
    # logins within a few intervals must not become thirty commits.
    batches = presence.batches_written - before
    assert 1 <= batches <= elapsed / presence.interval + 2
    assert batches < len(devices) // 3


@pytest.mark.slow
async def test_devices_a_dead_broker_left_online_are_set_offline_on_start(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    registry = DeviceRegistry(engine)
    try:
        device = await make_device(registry, "02:00:00:00:07:02")
        await registry.set_status(device.id, DeviceStatus.ONLINE)
    finally:
        await registry.close()
    async with BrokerServer(settings(database_url)) as server:
        found = await server.registry.get(device.id)
    assert found.status is DeviceStatus.OFFLINE


# -- 8. brute force and the login-timing side channel ----------------------------------------------


async def test_brute_force_on_one_username_from_one_address_is_throttled_as_configured(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(sqlite_url, throttle_after=3, lockout_after=6, max_refusal_delay=0.2)
    async with BrokerServer(config) as server:
        device = await make_device(server.registry, "02:00:00:00:08:01")
        user, port = device.mqtt_username, port_of(server)
        throttle = server.services.authenticator.throttle
        held_back: list[float] = []
        failed = throttle.failed

        def recording(username: str, address: str | None) -> float:
            delay = failed(username, address)
            held_back.append(delay)
            return delay

        monkeypatch.setattr(throttle, "failed", recording)

        def attempt(password: str, source: str) -> int:
            return login_code(port, user, username=user, password=password, source=source)

        codes = [await asyncio.to_thread(attempt, f"guess-{n}", "127.0.0.1") for n in range(6)]
        checks = server.services.authenticator.stats.bcrypt_checks
        locked = await asyncio.to_thread(attempt, PASSWORD, "127.0.0.1")
        unchecked = server.services.authenticator.stats.bcrypt_checks == checks
        device_elsewhere = await asyncio.to_thread(attempt, PASSWORD, "127.0.0.2")
    assert codes == [BAD_CREDENTIALS] * 6
    # Nothing for the first three, then doubling from 50 ms up to max_refusal_delay.
    assert held_back == [0.0, 0.0, 0.0, 0.05, 0.1, 0.2]
    assert locked == NOT_AUTHORIZED
    assert unchecked  # a locked-out pair costs no bcrypt at all
    assert device_elsewhere == ACCEPTED  # the real device behind another address is not locked out


REFUSALS = {
    # The first refusal of the process first: the dummy hash must not be made on first use.
    "unknown device username": ("device_0123456789ab", "device_0123456789ab", PASSWORD),
    "known device, wrong password": ("{device}", "{device}", "wrong-password"),
    "unknown account name": ("nobody", "nobody", ACCOUNT_PASSWORD),
    "known account, wrong password": ("backend", "backend", "wrong-password"),
    "device with no credentials yet": ("{pending}", "{pending}", PASSWORD),
}


def _without_pool(base: Settings) -> Settings:
    """No credentials hashed ahead from idle time: every bcrypt run counted is a login's."""
    return base.model_copy(
        update={"provisioning": base.provisioning.model_copy(update={"credential_pool_size": 0})}
    )


async def _refusal_costs(
    server: BrokerServer, names: dict[str, str], runs: list[tuple[str, int]]
) -> dict[str, list[tuple[str, int]]]:
    seen: dict[str, list[tuple[str, int]]] = {}
    for case, (client_id, username, password) in REFUSALS.items():
        runs.clear()
        code = await asyncio.to_thread(
            login_code,
            port_of(server),
            client_id.format(**names),
            username=username.format(**names),
            password=password,
        )
        assert code == BAD_CREDENTIALS, case
        seen[case] = list(runs)
    return seen


async def test_without_verifiers_every_refusal_costs_one_bcrypt_check_of_the_same_cost(
    sqlite_url: str, bcrypt_runs: list[tuple[str, int]]
) -> None:
    # The timing figure (python -m tests.bench --only login-timing) measures the medians; this
    # pins the cause: one bcrypt run at the configured cost on every refusal path, never two.
    async with BrokerServer(
        _without_pool(settings(sqlite_url, max_refusal_delay=0.01, verifiers=False))
    ) as server:
        device = await make_device(server.registry, "02:00:00:00:08:02")
        pending = await server.registry.create_device("02:00:00:00:08:03", status=DeviceStatus.PENDING)
        await make_account(server.accounts, "backend", ["subscribe devices/+/telemetry"])
        names = {"device": device.mqtt_username, "pending": pending.mqtt_username}
        seen = await _refusal_costs(server, names, bcrypt_runs)
    assert seen == {case: [("checkpw", 4)] for case in REFUSALS}


async def test_with_verifiers_no_refusal_of_a_verified_or_unknown_username_costs_bcrypt(
    sqlite_url: str, bcrypt_runs: list[tuple[str, int]]
) -> None:
    # Unknown usernames and wrong passwords of credentials that have logged in before cost one
    # HMAC each (docs/security/verifiers.md); a credential never logged in still costs bcrypt.
    async with BrokerServer(_without_pool(settings(sqlite_url, max_refusal_delay=0.01))) as server:
        device = await make_device(server.registry, "02:00:00:00:08:02")
        fresh = await make_device(server.registry, "02:00:00:00:08:04")
        pending = await server.registry.create_device("02:00:00:00:08:03", status=DeviceStatus.PENDING)
        await make_account(server.accounts, "backend", ["subscribe devices/+/telemetry"])
        names = {"device": device.mqtt_username, "pending": pending.mqtt_username}
        port = port_of(server)
        for name in (device.mqtt_username, "backend"):
            secret = PASSWORD if name.startswith("device_") else ACCOUNT_PASSWORD
            assert await asyncio.to_thread(login_code, port, name, username=name, password=secret) == ACCEPTED
        await server.services.authenticator.settle()  # the verifiers are written
        server.services.authenticator.cache.drop(device.mqtt_username)
        server.services.authenticator.cache.drop("backend")
        seen = await _refusal_costs(server, names, bcrypt_runs)
        bcrypt_runs.clear()
        code = await asyncio.to_thread(
            login_code, port, fresh.mqtt_username, username=fresh.mqtt_username, password="wrong-password"
        )
        assert code == BAD_CREDENTIALS
        assert bcrypt_runs == [("checkpw", 4)]  # never logged in: no verifier yet
    assert seen == {case: [] for case in REFUSALS}
