"""Operators and their console sessions in the registry, on SQLite and on PostgreSQL: only a
digest of a session id is stored, expiry and removal end sessions, names are unique."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from provisioning.registry import DeviceRegistry
from provisioning.registry.models import OperatorSession, utcnow
from provisioning.registry.operators import (
    ABSOLUTE,
    IDLE,
    OperatorError,
    OperatorExistsError,
    OperatorNotFoundError,
    OperatorStore,
)

HASH = "$2b$04$" + "a" * 53  # never checked here: the store keeps what it is given


@pytest.fixture
def operators(registry: DeviceRegistry) -> OperatorStore:
    return OperatorStore(registry.engine)


async def test_names_are_unique_and_validated(operators: OperatorStore) -> None:
    await operators.add("alice", HASH)
    with pytest.raises(OperatorExistsError):
        await operators.add("alice", HASH)
    for bad in ("", "1alice", "al ice", "a" * 65, "alice\n"):
        with pytest.raises(OperatorError):
            await operators.add(bad, HASH)
    assert [o.name for o in await operators.list_operators()] == ["alice"]
    assert await operators.find_login("bob") is None
    assert await operators.find_login("a" * 10_000) is None
    login = await operators.find_login("alice")
    assert login is not None
    assert login.password_hash == HASH
    assert HASH not in repr(login)


async def test_only_the_digest_of_a_session_id_is_stored(operators: OperatorStore) -> None:
    alice = await operators.add("alice", HASH)
    started = await operators.start_session(alice)
    async with operators._read() as session:
        digests = (await session.scalars(select(OperatorSession.digest))).all()
    assert digests == [hashlib.sha256(started.session_id.encode()).hexdigest()]
    assert started.session_id not in repr(started)
    live = await operators.session(started.session_id)
    assert live is not None
    assert live.operator.name == "alice"
    assert live.csrf_token == started.session.csrf_token
    # The digest itself, presented as a cookie, opens nothing.
    assert await operators.session(digests[0]) is None
    assert await operators.session("not-a-session-id") is None


@pytest.mark.parametrize(
    ("column", "age"), [("last_seen_at", IDLE), ("created_at", ABSOLUTE)], ids=["idle", "absolute"]
)
async def test_an_expired_session_is_refused_and_removed(
    operators: OperatorStore, column: str, age: timedelta
) -> None:
    alice = await operators.add("alice", HASH)
    started = await operators.start_session(alice)
    async with operators._write() as session:
        await session.execute(update(OperatorSession).values({column: utcnow() - age - timedelta(seconds=1)}))

    assert await operators.session(started.session_id) is None
    async with operators._read() as session:
        assert (await session.scalars(select(OperatorSession))).all() == []


async def test_logout_and_removal_end_sessions(operators: OperatorStore) -> None:
    alice = await operators.add("alice", HASH)
    first, second = await operators.start_session(alice), await operators.start_session(alice)
    await operators.end_session(first.session_id)
    assert await operators.session(first.session_id) is None
    assert await operators.session(second.session_id) is not None

    await operators.remove("alice")
    assert await operators.session(second.session_id) is None
    with pytest.raises(OperatorNotFoundError):
        await operators.remove("alice")
    async with operators._read() as session:
        assert (await session.scalars(select(OperatorSession))).all() == []
