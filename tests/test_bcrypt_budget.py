"""The bcrypt budget and the lockout under concurrency: who gets the workers when logins crowd in.

The budget is driven over a real :class:`PasswordHasher` with one worker (bcrypt at cost 4): the
order in which checks finish is the order the budget gave out turns, whatever the machine's speed.
The end-to-end test floods a real broker from a second loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import insert

from auth_plugin.authenticator import MAX_AUDITS_IN_FLIGHT, ConnectAttempt
from auth_plugin.budget import BcryptBudget
from broker.core import AuthCore, auth_core
from broker.embedded import BrokerServer
from provisioning.credential_pool import CredentialPool
from provisioning.passwords import PasswordHasher
from provisioning.registry.migrate import upgrade
from provisioning.registry.models import ServiceAccount, utcnow
from tests.auth_support import PASSWORD, hashed, login_code, make_device, settings

ACCEPTED, UNAVAILABLE, BAD_CREDENTIALS, NOT_AUTHORIZED = 0, 3, 4, 5
HASH = hashed(PASSWORD)


@pytest.fixture
async def hasher() -> AsyncIterator[PasswordHasher]:
    one = PasswordHasher(4, workers=1)
    yield one
    one.close()


async def _in_order(budget: BcryptBudget, sources: list[str]) -> tuple[list[str], list[bool | None]]:
    """Start one check per entry of ``sources`` at once; (the order they finished, their results)."""
    finished: list[str] = []

    async def check(name: str, source: str) -> bool | None:
        result = await budget.verify(source, PASSWORD, HASH)
        finished.append(name)
        return result

    names = [f"{source}{i}" for i, source in enumerate(sources)]
    results = await asyncio.gather(*(check(n, s) for n, s in zip(names, sources, strict=True)))
    return finished, list(results)


async def test_sources_take_turns_so_a_flood_does_not_delay_a_newcomer(hasher: PasswordHasher) -> None:
    budget = BcryptBudget(hasher, answer_within=10.0)
    finished, results = await _in_order(budget, ["a"] * 8 + ["b"])
    assert results == [True] * 9
    # a0 had the worker at once; then the turns go a, b, a, a...: b's one check is third, not last.
    assert finished[:3] == ["a0", "a1", "b8"]
    assert budget.refused == 0


async def test_a_full_budget_refuses_the_longest_queue_first(
    hasher: PasswordHasher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="auth_plugin.budget")
    hasher.seconds_per_check = 1.0  # the estimate the capacity is made from: 3 waiting checks
    budget = BcryptBudget(hasher, answer_within=3.0)
    assert budget.capacity() == 3
    finished, results = await _in_order(budget, ["a"] * 6 + ["b"])
    # a0 runs, a1-a3 wait, a4 and a5 find no room: refused at once. b6 takes a3's place.
    assert results == [True, True, True, None, None, None, True]
    assert finished[:3] == ["a4", "a5", "a3"]  # the refused ones are answered first, without a check
    assert budget.refused == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "auth_plugin.budget"]
    assert len([w for w in warnings if w.startswith("bcrypt budget full")]) == 1  # once per burst
    assert any(w.startswith("bcrypt budget: the burst is over; 3 login checks refused") for w in warnings)


async def test_a_source_that_guessed_wrong_is_served_after_every_other(hasher: PasswordHasher) -> None:
    budget = BcryptBudget(hasher, answer_within=10.0)
    assert await budget.verify("guesser", "a-guess", HASH) is False
    assert budget.is_suspect("guesser")
    finished: list[str] = []

    async def check(name: str, source: str, password: str) -> None:
        await budget.verify(source, password, HASH)
        finished.append(name)

    guesses = [check(f"guess{i}", "guesser", f"guess-{i}") for i in range(5)]
    devices = [check(f"device{i}", f"10.0.0.{i}", PASSWORD) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*guesses, *devices), 10)
    # guess0 took the idle worker at once; then every device before any other guess.
    assert finished[:4] == ["guess0", "device0", "device1", "device2"]


async def test_a_full_budget_gives_a_suspect_check_s_place_to_anyone_else(hasher: PasswordHasher) -> None:
    hasher.seconds_per_check = 1.0
    budget = BcryptBudget(hasher, answer_within=3.0)  # room for 3 waiting checks
    assert await budget.verify("guesser", "a-guess", HASH) is False
    hasher.seconds_per_check = 1.0
    gate = threading.Event()
    hasher._pool.submit(gate.wait)  # fault: the one worker is held until every check has asked
    try:
        first = asyncio.create_task(budget.verify("guesser", "guess-0", HASH))  # has the turn
        waiting = [asyncio.create_task(budget.verify("guesser", f"guess-{i}", HASH)) for i in (1, 2)]
        device = asyncio.create_task(budget.verify("10.0.0.1", PASSWORD, HASH))  # the third place
        await asyncio.sleep(0)
        newcomer = asyncio.create_task(budget.verify("10.0.0.2", PASSWORD, HASH))
        await asyncio.sleep(0)
    finally:
        gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *waiting, device, newcomer), 10)
    # The budget was full: the newcomer took the newest guess's place, though that queue (2) was
    # not longer than its own would be; the devices' checks both ran.
    assert results == [False, False, None, True, True]


async def test_a_turn_too_late_for_the_deadline_is_given_back_unused(hasher: PasswordHasher) -> None:
    budget = BcryptBudget(hasher, answer_within=10.0)
    hasher.seconds_per_check = 1.0  # what one check takes here (the estimate the budget uses)
    before = hasher.operations
    soon = asyncio.get_running_loop().time() + 0.5
    assert await budget.verify("a", PASSWORD, HASH, deadline=soon) is None
    assert (budget.late, hasher.operations) == (1, before)  # no bcrypt run for nobody
    later = asyncio.get_running_loop().time() + 5.0
    assert await budget.verify("a", PASSWORD, HASH, deadline=later) is True  # the slot was given back


async def test_other_bcrypt_work_queued_first_counts_against_the_room(hasher: PasswordHasher) -> None:
    hasher.seconds_per_check = 1.0
    budget = BcryptBudget(hasher, answer_within=3.0)
    # A backlog of hashes at issue ahead of the logins (the fault injected, as the workers count it).
    hasher.pending = 2
    assert budget.room() == 1
    hasher.pending = 5
    assert budget.room() == -2
    assert await budget.verify("a", PASSWORD, HASH) is None  # could not start before its client gives up
    hasher.pending = 0
    assert await budget.verify("a", PASSWORD, HASH) is True
    assert budget.refused == 1


async def test_a_check_whose_client_went_away_gives_its_turn_back(hasher: PasswordHasher) -> None:
    budget = BcryptBudget(hasher, answer_within=10.0)
    first = asyncio.create_task(budget.verify("a", PASSWORD, HASH))
    waiting = [asyncio.create_task(budget.verify("b", PASSWORD, HASH)) for _ in range(3)]
    await asyncio.sleep(0)  # all four have asked for a turn
    waiting[1].cancel()
    assert await first is True
    assert [await task for task in (waiting[0], waiting[2])] == [True, True]
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]
    # Nothing is left held: a new check runs at once.
    assert await asyncio.wait_for(budget.verify("c", PASSWORD, HASH), 10) is True


# -- the lockout under concurrency -------------------------------------------------------------------


@pytest.fixture
async def core(sqlite_url: str) -> AsyncIterator[AuthCore]:
    made = auth_core(settings(sqlite_url, lockout_after=10, max_refusal_delay=0))
    await upgrade(made.registry.engine)
    try:
        yield made
    finally:
        await made.close()


async def test_concurrent_guesses_get_lockout_after_checks_and_the_right_one_is_refused_too(
    core: AuthCore,
) -> None:
    device = await make_device(core.registry, "02:00:00:00:0e:01")
    user = device.mqtt_username

    def attempt(password: str, address: str = "192.0.2.7") -> ConnectAttempt:
        return ConnectAttempt(user, user, password, address=address)

    burst = [attempt(f"guess-{i}") for i in range(100)] + [attempt(PASSWORD)]
    decisions = await asyncio.gather(*(core.authenticator.authenticate(a) for a in burst))
    stats = core.authenticator.stats
    assert stats.bcrypt_checks == 10  # lockout_after checks in flight, no more
    assert not any(d.accepted for d in decisions)
    assert decisions[-1].code == UNAVAILABLE  # the right password came too late: not checked
    # The ten failures locked the pair: the right password is refused without a check...
    later = await core.authenticator.authenticate(attempt(PASSWORD))
    assert (later.accepted, later.code, stats.bcrypt_checks) == (False, NOT_AUTHORIZED, 10)
    # ...but not from another address (the real device behind another NAT).
    assert (await core.authenticator.authenticate(attempt(PASSWORD, "198.51.100.1"))).accepted


async def test_checks_in_flight_are_counted_per_pair_and_given_back(core: AuthCore) -> None:
    device = await make_device(core.registry, "02:00:00:00:0e:02")
    user = device.mqtt_username
    burst = [ConnectAttempt(user, user, PASSWORD, address="192.0.2.8") for _ in range(5)]
    decisions = await asyncio.gather(*(core.authenticator.authenticate(a) for a in burst))
    assert all(d.accepted for d in decisions)  # five right passwords at once: under the lockout
    assert core.authenticator.throttle._in_flight == {}


# -- end to end: one address floods, a real device still gets in -----------------------------------


async def test_refusal_audits_in_flight_are_bounded(core: AuthCore, monkeypatch: pytest.MonkeyPatch) -> None:
    device = await make_device(core.registry, "02:00:00:00:0e:03")
    user = device.mqtt_username
    stalled = asyncio.Event()
    original = core.registry.record_event

    async def stalled_write(*args: object, **kwargs: object) -> None:  # fault: a write that hangs
        await stalled.wait()
        await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(core.registry, "record_event", stalled_write)
    attempts = [ConnectAttempt(user, user, f"guess-{i}", address=f"192.0.2.{i}") for i in range(50)]
    decisions = await asyncio.gather(*(core.authenticator.authenticate(a) for a in attempts))
    assert {d.code for d in decisions} == {BAD_CREDENTIALS}
    assert len(core.authenticator._background) == MAX_AUDITS_IN_FLIGHT
    assert core.authenticator.stats.audits_dropped == 50 - MAX_AUDITS_IN_FLIGHT
    stalled.set()
    await core.authenticator.settle()
    events = await core.registry.events(device.id)
    assert sum(e.count for e in events if e.kind == "login_refused") == MAX_AUDITS_IN_FLIGHT


@pytest.mark.slow
async def test_a_flood_from_one_address_does_not_keep_a_real_device_out(sqlite_url: str) -> None:
    # bcrypt at cost 11 and the 5 s login deadline: 96 flooding connections keep a queue of checks
    # as long as the budget's room (or longer). First come, first served, the real device's check
    # would wait behind the whole queue and miss its deadline, or be refused, every time.
    config = settings(sqlite_url, bcrypt_cost=11, max_refusal_delay=0, lockout_after=1000)
    async with BrokerServer(config) as server:
        port = server.settings.broker.port
        at_cost_11 = hashed(PASSWORD, 11)  # every check the flood causes costs a real one
        victims = [
            await make_device(server.registry, f"02:00:00:00:0f:{i:02x}", password_hash=at_cost_11)
            for i in range(20)
        ]
        real = await make_device(server.registry, "02:00:00:00:0e:ff", password_hash=at_cost_11)
        stop = threading.Event()

        def flood(worker: int) -> int:
            sent = 0
            while not stop.is_set():
                name = victims[(worker + sent) % len(victims)].mqtt_username
                with contextlib.suppress(OSError):  # an attacker does not wait for its answers
                    login_code(
                        port, name, source="127.0.0.2", timeout=2, username=name, password=f"guess-{sent}"
                    )
                sent += 1
            return sent

        def real_device() -> list[int]:
            codes: list[int] = []
            name = real.mqtt_username
            while not codes or codes[-1] == UNAVAILABLE:
                codes.append(login_code(port, name, source="127.0.0.1", username=name, password=PASSWORD))
            return codes

        with ThreadPoolExecutor(max_workers=97) as pool:
            floods = [pool.submit(flood, i) for i in range(96)]
            try:
                await asyncio.to_thread(_until_queued, server)
                codes = await asyncio.wait_for(asyncio.to_thread(real_device), 60)
            finally:
                stop.set()
            sent = sum(f.result() for f in floods)
    assert codes[-1] == ACCEPTED
    assert len(codes) <= 3  # at most a couple of "try again"
    assert sent > len(codes)


def _until_queued(server: BrokerServer) -> None:
    """Wait until the flood keeps a queue of checks waiting for the worker (or full), up to 30 s."""
    budget = server.services.authenticator.budget
    pause = threading.Event()
    for _ in range(300):
        if budget.waiting >= 16 or budget.refused:
            return
        pause.wait(0.1)
    raise AssertionError("the flood never queued checks for the bcrypt worker")


@pytest.mark.slow
async def test_a_login_not_decided_before_its_deadline_is_refused_retryably(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = auth_core(settings(sqlite_url), answer_within=1.0)  # authd's request_timeout, say
    await upgrade(made.registry.engine)
    try:
        device = await make_device(made.registry, "02:00:00:00:0e:04")
        never = asyncio.Event()

        async def stalled(*_: object) -> None:  # fault: a registry read that never returns
            await never.wait()

        monkeypatch.setattr(made.registry, "find_credentials_by_username", stalled)
        user = device.mqtt_username
        decision = await asyncio.wait_for(
            made.authenticator.authenticate(ConnectAttempt(user, user, PASSWORD, address="192.0.2.9")), 10
        )
    finally:
        await made.close()
    assert (decision.accepted, decision.code) == (False, UNAVAILABLE)
    assert decision.reason == "not decided within 1s"


async def test_the_credential_pool_never_slips_a_hash_between_queued_login_checks(
    hasher: PasswordHasher, bcrypt_runs: list[tuple[str, int]]
) -> None:
    budget = BcryptBudget(hasher, answer_within=10.0)
    pool = CredentialPool(hasher, 3)
    checks = [asyncio.create_task(budget.verify(f"10.0.0.{i % 2}", PASSWORD, HASH)) for i in range(6)]
    filling = asyncio.create_task(pool.run())
    assert await asyncio.wait_for(asyncio.gather(*checks), 10) == [True] * 6
    await asyncio.wait_for(pool.wait_full(), 10)
    pool.request_stop()
    await filling
    started = [function for function, _ in bcrypt_runs]
    first, last = started.index("checkpw"), len(started) - 1 - started[::-1].index("checkpw")
    assert started[first : last + 1] == ["checkpw"] * 6  # no idle-time hash between two checks
    assert started.count("hashpw") == 3  # the pool's fill


async def test_an_account_never_logs_in_with_a_client_id_that_reads_as_a_mac(core: AuthCore) -> None:
    # An account named "ab" (refused today, possible in an older registry) must not own the
    # provisioning session of ab:cd:ef:01:23:45, through the broker or through authd.
    async with core.registry.engine.begin() as conn:
        await conn.execute(
            insert(ServiceAccount).values(
                name="ab", password_hash=hashed(PASSWORD), rules=[], created_at=utcnow(), updated_at=utcnow()
            )
        )
    as_mac = await core.authenticator.authenticate(ConnectAttempt("ab-cd-ef-01-23-45", "ab", PASSWORD))
    as_itself = await core.authenticator.authenticate(ConnectAttempt("ab-worker", "ab", PASSWORD))
    assert (as_mac.accepted, as_mac.code) == (False, NOT_AUTHORIZED)
    assert as_itself.accepted
    assert await core.authenticator.principal_for("ab", "ab-cd-ef-01-23-45") is None
