"""Devices per status kept by triggers (``device_status_counts``): exact after any mix of writers,
compactions and migrations, on SQLite and PostgreSQL; no deadlock between opposite status flips."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Table, Uuid, bindparam, delete, insert, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning.errors import InvalidTransitionError
from provisioning.registry import Base, Device, DeviceRegistry, DeviceStatus, create_engine, username_for
from provisioning.registry.migrate import alembic_config, upgrade
from provisioning.registry.models import utcnow
from provisioning.registry.presence import Presence, PresenceStore
from provisioning.registry.status_counts import COMPACT_ABOVE, COUNTS, compact
from tests.status_counts_support import StatusCounts, status_counts

DEVICES: Table = Device.__table__  # type: ignore[assignment]


@pytest.fixture
def engine(registry: DeviceRegistry) -> AsyncEngine:
    """The engine of this test's own database, migrated to head."""
    return registry.engine


def random_mac() -> str:
    """A locally administered unicast MAC nobody else in the test uses."""
    return ":".join(f"{octet:02x}" for octet in [0x02, *uuid.uuid4().bytes[:5]])


async def bulk_devices(engine: AsyncEngine, statuses: Sequence[DeviceStatus]) -> list[uuid.UUID]:
    """Insert one device per status given, in one statement (as ``db copy`` and imports do)."""
    ids = [uuid.uuid4() for _ in statuses]
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": device_id,
            "mac": random_mac(),
            "mqtt_username": username_for(device_id),
            "status": status.value,
            "sensor_types": [],
            "created_at": now,
            "updated_at": now,
        }
        for device_id, status in zip(ids, statuses, strict=True)
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(DEVICES), rows)
    return ids


def assert_exact(counts: StatusCounts) -> None:
    assert counts.kept == counts.counted


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Migrate down to ``revision`` (the product never does; an operator may, with Alembic)."""

    def _downgrade(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_downgrade)


async def triggers(engine: AsyncEngine) -> dict[str, str]:
    """The definition of every trigger (and PostgreSQL function) in the database."""
    if engine.dialect.name == "postgresql":
        query = (
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal "
            "UNION ALL SELECT proname, prosrc FROM pg_proc "
            "WHERE pronamespace = 'public'::regnamespace AND prokind = 'f'"
        )
    else:
        query = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
    async with engine.connect() as conn:
        rows: list[tuple[str, str]] = [tuple(row) for row in (await conn.exec_driver_sql(query)).all()]
        return dict(rows)


async def table_exists(engine: AsyncEngine, name: str) -> bool:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda sync: sync.dialect.has_table(sync, name))


# -- migrations -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_migration_seeds_drops_and_seeds_again(engine: AsyncEngine) -> None:
    await downgrade(engine, "0004")
    assert not await table_exists(engine, "device_status_counts")
    registry = DeviceRegistry(engine)
    made = [
        await registry.create_device(random_mac(), status=status)
        for status in [*DeviceStatus, DeviceStatus.OFFLINE, DeviceStatus.OFFLINE]
    ]

    await upgrade(engine)
    seeded = await status_counts(engine)
    assert seeded.kept == seeded.counted == {s.value: 1 for s in DeviceStatus} | {"offline": 3}
    assert (await registry.list_devices(status=DeviceStatus.OFFLINE)).total == 3

    await downgrade(engine, "0004")
    assert not await table_exists(engine, "device_status_counts")
    assert await triggers(engine) == {}
    # Writes go on without the triggers (left behind, they would fail on the missing table). The
    # delete is plain SQL: the registry's own delete also clears a verifier (0006), not there at 0004.
    async with engine.begin() as conn:
        await conn.execute(delete(Device).where(Device.id == made[0].id))
    await registry.set_status(made[1].id, DeviceStatus.OFFLINE)

    await upgrade(engine)
    again = await status_counts(engine)
    assert_exact(again)
    assert again.kept["offline"] == 4
    assert made[0].status.value not in again.kept


async def test_create_all_makes_the_triggers_the_migrations_make(engine: AsyncEngine) -> None:
    migrated = await triggers(engine)
    await downgrade(engine, "base")
    assert await triggers(engine) == {}

    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)

    assert await triggers(engine) == migrated
    assert len(migrated) == (5 if engine.dialect.name == "postgresql" else 3)
    await DeviceRegistry(engine).create_device(random_mac())
    made = await status_counts(engine)
    assert made.kept == made.counted == {"pending": 1}


# -- every writer, any order ----------------------------------------------------------------------

_STATUSES = st.sampled_from(list(DeviceStatus))
_PICK = st.integers(min_value=0, max_value=1000)
_TRANSITIONS = st.sampled_from(["approve", "reject", "reset", "decommission", "delete"])
_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("create"), _STATUSES),
        st.tuples(st.just("transition"), _TRANSITIONS, _PICK),
        st.tuples(st.just("set_status"), _PICK, _STATUSES),
        st.tuples(st.just("raw_update"), _PICK, _STATUSES),
        st.tuples(st.just("bulk_create"), st.lists(_STATUSES, max_size=6)),
        st.tuples(st.just("presence_batch"), st.lists(st.tuples(_PICK, st.booleans()), max_size=6)),
        st.tuples(st.just("all_offline")),
        st.tuples(st.just("compact")),
    ),
    max_size=25,
)


class _Writers:
    """Every way the registry's devices change, each named as in ``_OPERATIONS``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.registry = DeviceRegistry(engine)
        self.presence = PresenceStore(engine)

    async def pick(self, n: int) -> uuid.UUID | None:
        async with self.engine.connect() as conn:
            ids = list((await conn.scalars(select(DEVICES.c.id).order_by(DEVICES.c.id))).all())
        return ids[n % len(ids)] if ids else None

    async def create(self, status: DeviceStatus) -> None:
        await self.registry.create_device(random_mac(), status=status)

    async def bulk_create(self, statuses: list[DeviceStatus]) -> None:
        if statuses:
            await bulk_devices(self.engine, statuses)

    async def transition(self, kind: str, n: int) -> None:
        device_id = await self.pick(n)
        if device_id is not None:
            with contextlib.suppress(InvalidTransitionError):
                await getattr(self.registry, kind)(device_id)

    async def set_status(self, n: int, status: DeviceStatus) -> None:
        device_id = await self.pick(n)
        if device_id is not None:
            await self.registry.set_status(device_id, status)

    async def raw_update(self, n: int, status: DeviceStatus) -> None:
        device_id = await self.pick(n)
        async with self.engine.begin() as conn:
            statement = text("UPDATE devices SET status = :s WHERE id = :id").bindparams(
                bindparam("id", type_=Uuid())
            )
            await conn.execute(statement, {"s": status.value, "id": device_id})

    async def presence_batch(self, picks: list[tuple[int, bool]]) -> None:
        latest = {}
        for n, online in picks:
            device_id = await self.pick(n)
            if device_id is not None:
                latest[device_id] = Presence(online=online, at=utcnow())
        await self.presence.record(latest, {})

    async def all_offline(self) -> None:
        await self.presence.mark_all_offline()

    async def compact(self) -> None:
        async with self.engine.begin() as conn:
            await compact(conn)


@pytest.mark.slow
def test_counts_stay_exact_whatever_writes_and_compactions_come(database_url: str) -> None:
    asyncio.run(_migrate(database_url))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_OPERATIONS)
    def check(operations: list[tuple[Any, ...]]) -> None:
        asyncio.run(_apply_and_compare(database_url, operations))

    check()


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


async def _apply_and_compare(url: str, operations: list[tuple[Any, ...]]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:  # every example from an empty registry
            await conn.execute(DEVICES.delete())
            await conn.execute(COUNTS.delete())
        writers = _Writers(engine)
        for name, *args in operations:
            await getattr(writers, name)(*args)
        counts = await status_counts(engine)
        assert_exact(counts)
        registry = DeviceRegistry(engine)
        assert (await registry.list_devices()).total == sum(counts.counted.values())
        for status in DeviceStatus:
            assert (await registry.list_devices(status=status)).total == counts.counted.get(status.value, 0)
    finally:
        await engine.dispose()


async def test_raw_deletes_and_truncates_are_counted(engine: AsyncEngine) -> None:
    ids = await bulk_devices(engine, [DeviceStatus.ONLINE] * 3 + [DeviceStatus.PENDING] * 2)

    async with engine.begin() as conn:
        await conn.execute(DEVICES.delete().where(DEVICES.c.id == ids[0]))
    assert (await status_counts(engine)).kept == {"online": 2, "pending": 2}

    async with engine.begin() as conn:
        # CASCADE: device_labels refers to devices (0008), and PostgreSQL truncates only both.
        await conn.exec_driver_sql(
            "TRUNCATE devices CASCADE" if engine.dialect.name == "postgresql" else "DELETE FROM devices"
        )
    emptied = await status_counts(engine)
    assert emptied.kept == emptied.counted == {}


# -- readers --------------------------------------------------------------------------------------


async def test_a_reader_folds_many_rows_once(engine: AsyncEngine) -> None:
    await bulk_devices(engine, [DeviceStatus.OFFLINE] * (COMPACT_ABOVE + 1) + [DeviceStatus.PENDING])
    registry = DeviceRegistry(engine)

    page = await registry.list_devices(status=DeviceStatus.OFFLINE, limit=10)

    assert page.total == COMPACT_ABOVE + 1
    after = await status_counts(engine)
    assert_exact(after)
    assert after.rows == 2  # one per status


async def test_a_reader_on_a_read_only_database_still_gets_exact_totals(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await bulk_devices(engine, [DeviceStatus.OFFLINE] * (COMPACT_ABOVE + 1))
    await engine.dispose()
    read_only = await _read_only(engine)
    try:
        with caplog.at_level(logging.INFO, logger="provisioning.registry.search"):
            page = await DeviceRegistry(read_only).list_devices(status=DeviceStatus.OFFLINE)
    finally:
        await read_only.dispose()

    assert page.total == COMPACT_ABOVE + 1
    assert any(m.startswith("device status counts not compacted: ") for m in caplog.messages)
    assert (await status_counts(engine)).rows == COMPACT_ABOVE + 1


async def _read_only(engine: AsyncEngine) -> AsyncEngine:
    """An engine on the same database that may only read (a standby, a read-only file)."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            await conn.execute(
                text(f'ALTER DATABASE "{url.database}" SET default_transaction_read_only = on')
            )
            await conn.commit()
        return create_engine(url.render_as_string(hide_password=False))
    path = Path(url.database or "")
    return create_engine(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")


# -- concurrent writers and compactors on PostgreSQL ----------------------------------------------


@pytest.fixture
async def pg_engines(postgres_url: str) -> AsyncIterator[list[AsyncEngine]]:
    """Three engines (three processes' pools) on one migrated PostgreSQL database."""
    engines = [create_engine(postgres_url) for _ in range(3)]
    await upgrade(engines[0])
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.mark.postgres
async def test_opposite_status_flips_from_two_engines_neither_wait_nor_drift(
    pg_engines: list[AsyncEngine],
) -> None:
    first, second, operator = pg_engines
    going_offline = await bulk_devices(first, [DeviceStatus.ONLINE] * 150)
    going_online = await bulk_devices(first, [DeviceStatus.OFFLINE] * 150)

    async def flip(store: PresenceStore, ids: list[uuid.UUID], online: bool) -> None:
        # Each batch changes both statuses' counts in one transaction, in opposite order to the
        # other engine's: counter rows updated in place would deadlock here.
        for _ in range(15):
            online = not online
            await store.record({device_id: Presence(online=online, at=utcnow()) for device_id in ids}, {})

    async def operate(registry: DeviceRegistry, ids: list[uuid.UUID]) -> None:
        for device_id in ids[:20]:  # the CLI, without compacting
            await registry.set_status(device_id, DeviceStatus.REGISTERED)

    async with asyncio.timeout(60):
        await asyncio.gather(
            flip(PresenceStore(first), going_offline[20:], online=True),
            flip(PresenceStore(second), going_online[20:], online=False),
            operate(DeviceRegistry(operator), going_offline),
            operate(DeviceRegistry(operator), going_online),
        )

    counts = await status_counts(first)
    assert_exact(counts)
    assert counts.counted == {"registered": 40, "online": 130, "offline": 130}


@pytest.mark.postgres
async def test_a_compactor_skips_rows_another_holds_and_both_stay_exact(
    pg_engines: list[AsyncEngine],
) -> None:
    first, second, writer = pg_engines
    await bulk_devices(writer, [DeviceStatus.ONLINE] * 50)
    async with first.connect() as holding:
        await holding.begin()
        assert await compact(holding) == 50  # locked, and its summed row not yet visible
        await bulk_devices(writer, [DeviceStatus.ONLINE] * 30 + [DeviceStatus.PENDING] * 5)

        async with asyncio.timeout(5), second.begin() as conn:  # no waiting for the first
            assert await compact(conn) == 35

        await holding.commit()

    counts = await status_counts(writer)
    assert counts.kept == counts.counted == {"online": 80, "pending": 5}
    assert counts.rows == 3  # 50 online from the first, 30 online and 5 pending from the second


@pytest.mark.slow
@pytest.mark.postgres
async def test_concurrent_compactors_and_writers_stay_exact(pg_engines: list[AsyncEngine]) -> None:
    first, second, writer = pg_engines
    await bulk_devices(writer, [DeviceStatus.OFFLINE] * 40)

    async def compactor(engine: AsyncEngine) -> None:
        for _ in range(40):
            async with engine.begin() as conn:
                await compact(conn)

    async def write() -> None:
        registry = DeviceRegistry(writer)
        for _ in range(40):
            await bulk_devices(writer, [DeviceStatus.ONLINE, DeviceStatus.OFFLINE])
            device = await registry.create_device(random_mac(), status=DeviceStatus.APPROVED)
            await registry.delete(device.id)

    async with asyncio.timeout(60):
        await asyncio.gather(compactor(first), compactor(second), compactor(first), write())

    counts = await status_counts(writer)
    assert counts.kept == counts.counted == {"online": 40, "offline": 80}
