"""The credential pool: credentials hashed ahead from idle bcrypt time, handed out once, kept nowhere.

The idle-priority mechanism is tested on :class:`PasswordHasher` by the order in which bcrypt runs
start in its single worker thread; the pool end to end over a real broker on a free port.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

import provisioning.credential_pool
from broker.embedded import BrokerServer
from provisioning.credential_pool import CredentialPool, PooledCredential
from provisioning.passwords import PasswordHasher, generate_password
from tests.mosquitto_node import call, mosquitto_missing, mosquitto_stack
from tests.mqtt_clients import (
    ACCEPTED,
    WAIT,
    assert_ok,
    login,
    provisioning_broker,
    request_provisioning,
)

POOL_TASK = "mqttprov-credential-pool"


class BcryptRuns:
    """Every bcrypt run in the order the worker threads start them; one kind can be held at its start."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[str] = []
        self.entered = threading.Event()
        self._release = threading.Event()
        self._release.set()
        self._hold: str | None = None
        checkpw, hashpw = bcrypt.checkpw, bcrypt.hashpw

        def counting_checkpw(password: bytes, hashed: bytes) -> bool:
            self._start("checkpw")
            return checkpw(password, hashed)

        def counting_hashpw(password: bytes, salt: bytes) -> bytes:
            self._start("hashpw")
            return hashpw(password, salt)

        monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
        monkeypatch.setattr(bcrypt, "hashpw", counting_hashpw)

    def hold_next(self, kind: str) -> None:
        """The next run of ``kind`` waits in its worker thread until :meth:`release`."""
        self._hold = kind
        self.entered.clear()
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def _start(self, kind: str) -> None:
        self.started.append(kind)
        if kind == self._hold:
            self._hold = None
            self.entered.set()
            assert self._release.wait(WAIT), "a held bcrypt run was never released"


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[BcryptRuns]:
    spy = BcryptRuns(monkeypatch)
    yield spy
    spy.release()  # a failed test must not leave a worker thread waiting


@pytest.fixture
def hasher() -> Iterator[PasswordHasher]:
    """One worker: the order bcrypt runs start in is the order the tests assert."""
    h = PasswordHasher(4, workers=1)
    yield h
    h.close()


@pytest.fixture
def pooled_passwords(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password the pool generates from now on (used or not)."""
    made: list[str] = []
    real = generate_password

    def recording() -> str:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(provisioning.credential_pool, "generate_password", recording)
    return made


# -- idle priority in PasswordHasher ------------------------------------------------------------------


async def test_a_fill_hash_waits_while_a_login_check_is_queued(
    hasher: PasswordHasher, runs: BcryptRuns
) -> None:
    stored = await hasher.hash("login")
    runs.started.clear()
    runs.hold_next("checkpw")
    first = asyncio.create_task(hasher.verify("login", stored))
    assert await asyncio.to_thread(runs.entered.wait, WAIT)
    fill = asyncio.create_task(hasher.hash_when_idle("pooled"))
    second = asyncio.create_task(hasher.verify("login", stored))
    # Released only after both tasks above took their first step: the fill found a check running
    # and one queued. Had it been submitted then, it would run before the queued check.
    asyncio.get_running_loop().call_soon(runs.release)
    assert await first is True
    assert await second is True
    pooled_hash = await asyncio.wait_for(fill, WAIT)

    assert runs.started == ["checkpw", "checkpw", "hashpw"]
    assert (hasher.operations, hasher.idle_operations, hasher.pending) == (3, 1, 0)
    assert await hasher.verify("pooled", pooled_hash) is True


async def test_logins_wait_for_at_most_the_one_fill_hash_running(
    hasher: PasswordHasher, runs: BcryptRuns
) -> None:
    stored = await hasher.hash("login")
    runs.started.clear()
    runs.hold_next("hashpw")
    first_fill = asyncio.create_task(hasher.hash_when_idle("pooled-1"))
    assert await asyncio.to_thread(runs.entered.wait, WAIT)
    # The second fill asks first, yet the checks go before it: one fill hash at a time, and
    # none while other work is queued.
    second_fill = asyncio.create_task(hasher.hash_when_idle("pooled-2"))
    checks = [asyncio.create_task(hasher.verify("login", stored)) for _ in range(3)]
    asyncio.get_running_loop().call_soon(runs.release)
    assert await asyncio.gather(*checks) == [True, True, True]
    await asyncio.wait_for(asyncio.gather(first_fill, second_fill), WAIT)

    # The checks waited for the fill already running, never for the second one.
    assert runs.started == ["hashpw", "checkpw", "checkpw", "checkpw", "hashpw"]
    assert hasher.idle_operations == 2
    assert hasher.pending == 0


async def test_stopping_the_pool_abandons_its_wait_for_idle_time(
    hasher: PasswordHasher, runs: BcryptRuns, caplog: pytest.LogCaptureFixture
) -> None:
    stored = await hasher.hash("login")
    pool = CredentialPool(hasher, 4)
    runs.hold_next("checkpw")
    check = asyncio.create_task(hasher.verify("login", stored))
    assert await asyncio.to_thread(runs.entered.wait, WAIT)
    filling = asyncio.create_task(pool.run(), name=POOL_TASK)
    asyncio.get_running_loop().call_soon(pool.request_stop)
    # Returns with the check still held: the stop did not wait for bcrypt to become idle.
    await asyncio.wait_for(filling, WAIT)
    runs.release()
    assert await check is True
    assert (hasher.idle_operations, pool.ready, pool.taken) == (0, 0, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_an_unexpected_error_is_logged_and_only_ends_the_filling(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failed = asyncio.Event()

    async def broken(password: str) -> str:
        failed.set()
        raise RuntimeError("injected fault")

    monkeypatch.setattr(hasher, "hash_when_idle", broken)
    pool = CredentialPool(hasher, 4)
    filling = asyncio.create_task(pool.run(), name=POOL_TASK)
    await asyncio.wait_for(failed.wait(), WAIT)
    pool.request_stop()
    await asyncio.wait_for(filling, WAIT)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.name for r in errors] == ["provisioning.credential_pool"]
    assert "no longer filled" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert pool.take() is None


async def test_the_pool_fills_to_its_size_and_hands_each_credential_out_once(
    hasher: PasswordHasher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="provisioning.credential_pool")
    pool = CredentialPool(hasher, 5)
    filling = asyncio.create_task(pool.run(), name=POOL_TASK)
    try:
        await asyncio.wait_for(pool.wait_full(), WAIT)
        first = [pool.take() for _ in range(5)]
        await asyncio.wait_for(pool.wait_full(), WAIT)  # refilled once idle again
        second = [pool.take() for _ in range(5)]
    finally:
        pool.request_stop()
        await asyncio.wait_for(filling, WAIT)
    taken = [c for c in first + second if c is not None]
    assert len(taken) == 10
    assert len({c.password for c in taken}) == 10
    assert all(bcrypt.checkpw(c.password.encode(), c.password_hash.encode()) for c in taken)
    assert all(c.password_hash.startswith("$2b$04$") for c in taken)
    assert hasher.operations == 0  # all idle-time work
    assert [r.getMessage() for r in caplog.records] == ["credential pool full: 5 credentials ready"]


async def test_neither_a_pooled_credential_nor_the_pool_shows_a_secret() -> None:
    credential = PooledCredential("pw-" + "x" * 29, "$2b$04$" + "y" * 53)
    hasher = PasswordHasher(4, workers=1)
    try:
        pool = CredentialPool(hasher, 3)
        for shown in (repr(credential), str(credential), f"{credential!r}", repr([credential]), repr(pool)):
            assert "xxx" not in shown
            assert "yyy" not in shown
            assert "$2b$" not in shown
    finally:
        hasher.close()


# -- end to end, over a real broker ---------------------------------------------------------------


async def _provision(port: int, mac: str) -> dict[str, Any]:
    body = await asyncio.to_thread(request_provisioning, port, mac, {"mac": mac})
    assert body is not None, f"no reply for {mac}"
    assert_ok(body)
    return body


async def test_a_pooled_credential_logs_in_and_costs_no_hash_at_issue(
    sqlite_url: str, pooled_passwords: list[str]
) -> None:
    async with provisioning_broker(sqlite_url, credential_pool_size=4) as server:
        pool, hasher = server.services.provisioning.pool, server.hasher
        await asyncio.wait_for(pool.wait_full(), WAIT)
        port, operations = server.settings.broker.port, hasher.operations
        bodies = [await _provision(port, f"02:00:00:00:0c:{i:02x}") for i in range(3)]

        assert hasher.operations == operations  # nothing hashed at issue
        assert pool.taken == 3
        assert {b["mqtt_password"] for b in bodies} <= set(pooled_passwords)
        for body in bodies:
            assert await asyncio.to_thread(login, port, body) == ACCEPTED
            record = await server.registry.find_credentials_by_mac(await _mac_of(server, body))
            assert record is not None
            assert record.password_hash is not None
            assert bcrypt.checkpw(body["mqtt_password"].encode(), record.password_hash.encode())


async def _mac_of(server: BrokerServer, body: dict[str, Any]) -> str:
    return (await server.registry.get(assert_ok(body))).mac


@pytest.mark.slow
async def test_a_burst_of_requests_gets_every_credential_once(
    sqlite_url: str, pooled_passwords: list[str]
) -> None:
    async with provisioning_broker(sqlite_url, credential_pool_size=8) as server:
        pool = server.services.provisioning.pool
        await asyncio.wait_for(pool.wait_full(), WAIT)
        port = server.settings.broker.port
        macs = [f"02:00:00:00:0d:{i:02x}" for i in range(30)]
        bodies = await asyncio.gather(*(_provision(port, mac) for mac in macs))
        codes = await asyncio.gather(*(asyncio.to_thread(login, port, body) for body in bodies))
        records = [await server.registry.find_credentials_by_mac(mac) for mac in macs]

    passwords = [b["mqtt_password"] for b in bodies]
    assert len(set(passwords)) == 30
    assert codes == [ACCEPTED] * 30
    assert len({record.password_hash for record in records if record is not None}) == 30
    from_pool = [p for p in passwords if p in set(pooled_passwords)]
    assert len(from_pool) == pool.taken >= 8  # the whole pool, and what refilled in lulls


@pytest.mark.slow
async def test_pool_size_zero_hashes_at_issue_and_never_fills(
    sqlite_url: str, pooled_passwords: list[str]
) -> None:
    async with provisioning_broker(sqlite_url, credential_pool_size=0) as server:
        pool, hasher = server.services.provisioning.pool, server.hasher
        await asyncio.wait_for(pool.wait_full(), WAIT)  # off: "full" at once
        port, operations = server.settings.broker.port, hasher.operations
        body = await _provision(port, "02:00:00:00:0e:01")
        assert await asyncio.to_thread(login, port, body) == ACCEPTED
        assert hasher.operations == operations + 2  # the hash at issue, the login's check
        filler = [t for t in asyncio.all_tasks() if t.get_name() == POOL_TASK]
        assert len(filler) == 1
        assert not filler[0].done()  # waits to be stopped, without a restart
    assert (hasher.idle_operations, pool.ready, pool.taken, pooled_passwords) == (0, 0, 0, [])


def _database_bytes(directory: Path) -> bytes:
    """The SQLite file and whatever journal or WAL it left beside it."""
    return b"".join(path.read_bytes() for path in sorted(directory.glob("registry.db*")))


async def test_pooled_passwords_reach_no_file_and_no_log(
    sqlite_url: str, tmp_path: Path, pooled_passwords: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with provisioning_broker(sqlite_url, credential_pool_size=6) as server:
        pool = server.services.provisioning.pool
        await asyncio.wait_for(pool.wait_full(), WAIT)
        port = server.settings.broker.port
        bodies = [await _provision(port, f"02:00:00:00:0f:{i:02x}") for i in range(3)]
        for body in bodies:
            assert await asyncio.to_thread(login, port, body) == ACCEPTED
        unused = pool.ready
        assert unused > 0
        logging.getLogger("tests").info("pool at shutdown: %r", pool)
    assert pool.ready == 0  # the unused ones were dropped with the fill loop

    issued = {b["mqtt_password"] for b in bodies}
    assert issued <= set(pooled_passwords)
    assert len(pooled_passwords) >= len(issued) + unused
    stored = _database_bytes(tmp_path)
    assert stored  # the registry was written here
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for password in pooled_passwords:
        assert password.encode() not in stored
        assert password not in logged


async def test_shutdown_leaves_no_pool_task_and_no_bcrypt_thread(sqlite_url: str) -> None:
    before = {t.ident for t in threading.enumerate() if t.name.startswith("bcrypt")}
    async with provisioning_broker(sqlite_url, credential_pool_size=10_000) as server:
        pool = server.services.provisioning.pool
        # Stopped while filling: a hash may be running in a worker thread at that moment.
        await _provision(server.settings.broker.port, "02:00:00:00:10:01")
        assert pool.ready < pool.size
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(POOL_TASK)]
    after = {t.ident for t in threading.enumerate() if t.name.startswith("bcrypt")}
    assert after <= before
    assert pool.ready == 0


class _Announced(logging.Handler):
    """Sets ``event`` when the pool says it is full (the worker keeps its service to itself)."""

    def __init__(self, event: asyncio.Event) -> None:
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("credential pool full"):
            self.event.set()  # emitted on the loop's thread, by the fill loop


@pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing()))
async def test_the_external_worker_fills_its_pool_and_stops_it(
    tmp_path: Path, sqlite_url: str, pooled_passwords: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="provisioning.credential_pool")
    full = asyncio.Event()
    announced = _Announced(full)
    logging.getLogger("provisioning.credential_pool").addHandler(announced)
    try:
        options = {"provisioning": {"credential_pool_size": 3}}
        async with mosquitto_stack(tmp_path, sqlite_url, options=options) as stack:
            await asyncio.wait_for(full.wait(), WAIT)
            body = await call(stack.provision, "aa:bb:cc:00:11:01")
            assert body is not None
            assert_ok(body)
            assert body["mqtt_password"] in pooled_passwords
            assert await call(login, stack.node.device_port, body) == ACCEPTED
    finally:
        logging.getLogger("provisioning.credential_pool").removeHandler(announced)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(POOL_TASK)]
    for password in pooled_passwords:
        assert password not in caplog.text
