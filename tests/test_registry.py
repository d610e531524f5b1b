"""The device registry on SQLite and PostgreSQL: lookups, uniqueness, life cycle and audit events."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from provisioning import (
    DeviceExistsError,
    DeviceNotFoundError,
    InvalidMacError,
    ProvisioningError,
    RegistryUnavailableError,
)
from provisioning.registry import (
    Actor,
    DeviceEventInfo,
    DeviceInfo,
    DeviceRegistry,
    DeviceStatus,
    create_engine,
    username_for,
)
from provisioning.registry.migrate import upgrade

MAC = "aa:bb:cc:00:11:22"
MAC_NOTATIONS = ["aa:bb:cc:00:11:22", "AA-BB-CC-00-11-22", "aabb.cc00.1122", "AABBCC001122"]
# Shaped like a bcrypt hash; the registry never looks inside.
FAKE_HASH = "$2b$04$" + "x" * 53


def mac_for(n: int) -> str:
    return f"02:00:00:00:{n // 256:02x}:{n % 256:02x}"


async def kinds(registry: DeviceRegistry, device_id: uuid.UUID) -> list[str]:
    """The device's event kinds, oldest first."""
    return [e.kind for e in reversed(await registry.events(device_id))]


# -- create and look up ---------------------------------------------------------------------------


async def test_create_device_returns_view(registry: DeviceRegistry) -> None:
    info = await registry.create_device(
        "AA-BB-CC-00-11-22", firmware_version="1.2.3", sensor_types=["temperature", "humidity"]
    )

    assert info.mac == MAC
    assert info.mqtt_username == username_for(info.id) == f"device_{info.id.hex[:12]}"
    assert info.status is DeviceStatus.PENDING
    assert info.firmware_version == "1.2.3"
    assert info.sensor_types == ["temperature", "humidity"]
    assert info.has_credentials is False
    assert info.last_seen_at is None
    assert await registry.get(info.id) == info


async def test_create_device_records_created_event(registry: DeviceRegistry) -> None:
    info = await registry.create_device(MAC, actor=Actor.OPERATOR, detail={"via": "cli"})

    [event] = await registry.events(info.id)

    assert event.kind == "created"
    assert event.actor == "operator"
    assert event.mac == MAC
    assert event.detail == {"via": "cli"}
    assert event.count == 1


async def test_create_device_rejects_bad_mac(registry: DeviceRegistry) -> None:
    with pytest.raises(InvalidMacError):
        await registry.create_device("aa:bb:cc:dd:ee:+")

    assert (await registry.list_devices()).total == 0


async def test_find_by_mac_accepts_every_notation(registry: DeviceRegistry) -> None:
    info = await registry.create_device(MAC)

    for text in MAC_NOTATIONS:
        assert await registry.find_by_mac(text) == info
    assert await registry.find_by_mac("aa:bb:cc:00:11:23") is None
    with pytest.raises(InvalidMacError):
        await registry.find_by_mac("aa:bb:cc:00:11")


async def test_find_by_username(registry: DeviceRegistry) -> None:
    info = await registry.create_device(MAC)

    assert await registry.find_by_username(info.mqtt_username) == info
    assert await registry.find_by_username("device_000000000000") is None


async def test_get_unknown_id(registry: DeviceRegistry) -> None:
    with pytest.raises(DeviceNotFoundError):
        await registry.get(uuid.uuid4())


@pytest.mark.slow
@pytest.mark.parametrize("notation", MAC_NOTATIONS)
async def test_resolve_by_mac_in_any_notation(registry: DeviceRegistry, notation: str) -> None:
    info = await registry.create_device(MAC)

    assert await registry.resolve(notation) == info


async def test_resolve_by_id_and_username(registry: DeviceRegistry) -> None:
    info = await registry.create_device(MAC)

    assert await registry.resolve(str(info.id)) == info
    assert await registry.resolve(str(info.id).upper()) == info
    assert await registry.resolve(info.mqtt_username) == info
    assert await registry.resolve(f"  {info.mqtt_username}\n") == info


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [str(uuid.UUID(int=1)), "aa:bb:cc:dd:ee:ff", "device_ffffffffffff"],
    ids=["uuid", "mac", "username"],
)
async def test_resolve_unknown(registry: DeviceRegistry, text: str) -> None:
    await registry.create_device(MAC)

    with pytest.raises(DeviceNotFoundError):
        await registry.resolve(text)


async def test_resolve_bad_mac_text(registry: DeviceRegistry) -> None:
    with pytest.raises(InvalidMacError):
        await registry.resolve("not-a-mac")


# -- uniqueness -----------------------------------------------------------------------------------


async def test_duplicate_mac_in_other_notation(registry: DeviceRegistry) -> None:
    first = await registry.create_device(MAC)

    with pytest.raises(DeviceExistsError, match=MAC) as info:
        await registry.create_device("AABB.CC00.1122")

    assert info.value.error_code == "ALREADY_EXISTS"
    page = await registry.list_devices()
    assert page.total == 1
    assert page.devices == [first]


@pytest.mark.slow
async def test_concurrent_creates_of_one_mac_give_one_row(registry: DeviceRegistry) -> None:
    notations = MAC_NOTATIONS * 5
    results = await asyncio.gather(
        *(registry.create_device(text) for text in notations), return_exceptions=True
    )

    created = [r for r in results if isinstance(r, DeviceInfo)]
    refused = [r for r in results if isinstance(r, DeviceExistsError)]
    assert len(created) == 1
    assert len(refused) == len(notations) - 1
    page = await registry.list_devices()
    assert page.total == 1
    assert page.devices == created


# -- listing --------------------------------------------------------------------------------------


async def test_list_devices_pages_oldest_first(registry: DeviceRegistry) -> None:
    made = [(await registry.create_device(mac_for(n))).id for n in range(7)]

    first = await registry.list_devices(limit=3)
    second = await registry.list_devices(limit=3, offset=3)
    last = await registry.list_devices(limit=3, offset=6)
    beyond = await registry.list_devices(limit=3, offset=7)

    assert [p.total for p in (first, second, last, beyond)] == [7, 7, 7, 7]
    assert [len(p.devices) for p in (first, second, last, beyond)] == [3, 3, 1, 0]
    assert [d.id for p in (first, second, last) for d in p.devices] == made


async def test_list_devices_filters_by_status(registry: DeviceRegistry) -> None:
    for n in range(3):
        await registry.create_device(mac_for(n))
    registered = {
        (await registry.create_device(mac_for(n), status=DeviceStatus.REGISTERED)).id for n in range(3, 5)
    }

    page = await registry.list_devices(status=DeviceStatus.REGISTERED)
    pending = await registry.list_devices(status=DeviceStatus.PENDING, limit=1)
    empty = await registry.list_devices(status=DeviceStatus.ONLINE)

    assert page.total == 2
    assert {d.id for d in page.devices} == registered
    assert pending.total == 3
    assert len(pending.devices) == 1
    assert empty.total == 0
    assert empty.devices == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("limit", "offset", "message"),
    [(0, 0, "limit"), (1001, 0, "limit"), (-5, 0, "limit"), (10, -1, "offset")],
)
async def test_list_devices_validates_paging(
    registry: DeviceRegistry, limit: int, offset: int, message: str
) -> None:
    with pytest.raises(ProvisioningError, match=message):
        await registry.list_devices(limit=limit, offset=offset)


async def test_list_devices_accepts_bounds(registry: DeviceRegistry) -> None:
    await registry.create_device(MAC)

    assert len((await registry.list_devices(limit=1)).devices) == 1
    assert len((await registry.list_devices(limit=1000)).devices) == 1


# -- decommission and delete ----------------------------------------------------------------------


async def test_decommission_destroys_credentials(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC, status=DeviceStatus.REGISTERED, password_hash=FAKE_HASH)
    assert made.has_credentials is True

    info = await registry.decommission(made.id)

    assert info.status is DeviceStatus.DECOMMISSIONED
    assert info.has_credentials is False
    assert info.updated_at > made.updated_at
    # The returned view is what was committed, updated_at included.
    assert await registry.get(made.id) == info
    [event] = [e for e in await registry.events(made.id) if e.kind == "decommissioned"]
    assert event.actor == "operator"


async def test_decommission_is_idempotent(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC, status=DeviceStatus.REGISTERED, password_hash=FAKE_HASH)

    first = await registry.decommission(made.id)
    second = await registry.decommission(made.id, actor=Actor.SYSTEM)

    assert second.status is DeviceStatus.DECOMMISSIONED
    assert second.has_credentials is False
    assert second.id == first.id
    assert await kinds(registry, made.id) == ["created", "decommissioned"]


async def test_decommission_unknown_device(registry: DeviceRegistry) -> None:
    with pytest.raises(DeviceNotFoundError):
        await registry.decommission(uuid.uuid4())


async def test_delete_removes_row_and_keeps_audit_trail(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC, status=DeviceStatus.REGISTERED)

    deleted = await registry.delete(made.id)

    assert deleted.id == made.id
    with pytest.raises(DeviceNotFoundError):
        await registry.get(made.id)
    assert await registry.find_by_mac(MAC) is None
    assert (await registry.list_devices()).total == 0
    events = await registry.events(made.id)
    assert [e.kind for e in events] == ["deleted", "created"]
    assert events[0].detail == {"status": "registered"}
    assert events[0].mac == MAC


async def test_deleted_mac_can_be_created_again(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)
    await registry.delete(made.id)

    again = await registry.create_device(MAC)

    assert again.id != made.id
    assert await registry.resolve(MAC) == again


async def test_delete_unknown_device(registry: DeviceRegistry) -> None:
    with pytest.raises(DeviceNotFoundError):
        await registry.delete(uuid.uuid4())


# -- audit events ---------------------------------------------------------------------------------


async def test_identical_foldable_events_share_a_row(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)

    for _ in range(3):
        await registry.record_event(
            made.id, "refused", actor=Actor.DEVICE, detail={"reason": "bad password"}, mac=MAC, fold=True
        )

    [refused] = [e for e in await registry.events(made.id) if e.kind == "refused"]
    assert refused.count == 3
    assert refused.last_at >= refused.created_at
    assert refused.detail == {"reason": "bad password"}


async def test_foldable_events_with_other_detail_are_separate(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)

    for reason in ("bad password", "bad password", "decommissioned"):
        await registry.record_event(
            made.id, "refused", actor=Actor.DEVICE, detail={"reason": reason}, fold=True
        )

    refused = [e for e in await registry.events(made.id) if e.kind == "refused"]
    assert sorted((e.detail["reason"], e.count) for e in refused) == [
        ("bad password", 2),
        ("decommissioned", 1),
    ]


@pytest.mark.slow
async def test_concurrent_foldable_events_lose_no_count(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)

    await asyncio.gather(
        *(registry.record_event(made.id, "refused", actor=Actor.DEVICE, fold=True) for _ in range(20))
    )

    refused = [e for e in await registry.events(made.id, limit=100) if e.kind == "refused"]
    assert [e.count for e in refused] == [20]


async def test_events_without_fold_are_separate(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)

    for _ in range(3):
        await registry.record_event(made.id, "login", actor=Actor.DEVICE, detail={"ip": "192.0.2.1"})

    logins = [e for e in await registry.events(made.id) if e.kind == "login"]
    assert [e.count for e in logins] == [1, 1, 1]
    assert len({e.id for e in logins}) == 3


async def test_events_newest_first_and_limited(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)
    for n in range(5):
        await registry.record_event(made.id, f"step{n}", actor=Actor.SYSTEM)

    events = await registry.events(made.id, limit=2)

    assert [e.kind for e in events] == ["step4", "step3"]


# -- views never leak the hash; times are aware ---------------------------------------------------


async def test_device_info_never_carries_the_hash(registry: DeviceRegistry) -> None:
    info = await registry.create_device(MAC, status=DeviceStatus.REGISTERED, password_hash=FAKE_HASH)
    fetched = await registry.get(info.id)

    for view in (info, fetched):
        assert view.has_credentials is True
        assert not hasattr(view, "password_hash")
        dumped = view.model_dump()
        assert [key for key in dumped if "hash" in key and key != "has_credentials"] == []
        assert FAKE_HASH not in view.model_dump_json()
        assert FAKE_HASH not in repr(view)
    assert "password_hash" not in DeviceInfo.model_fields


async def test_timestamps_are_timezone_aware(registry: DeviceRegistry) -> None:
    made = await registry.create_device(MAC)
    await registry.record_event(made.id, "refused", actor=Actor.DEVICE, fold=True)
    fetched = await registry.get(made.id)
    listed = (await registry.list_devices()).devices[0]
    events: list[DeviceEventInfo] = await registry.events(made.id)

    for info in (made, fetched, listed):
        assert info.created_at.utcoffset() is not None
        assert info.updated_at.utcoffset() is not None
    assert fetched.created_at == made.created_at
    for event in events:
        assert event.created_at.utcoffset() is not None
        assert event.last_at.utcoffset() is not None


# -- unusable databases ---------------------------------------------------------------------------


async def test_unmigrated_database_says_run_upgrade(database_url: str) -> None:
    registry = DeviceRegistry(create_engine(database_url))
    try:
        with pytest.raises(RegistryUnavailableError, match="mqttprov db upgrade"):
            await registry.list_devices()
        with pytest.raises(RegistryUnavailableError, match="mqttprov db upgrade"):
            await registry.create_device(MAC)
    finally:
        await registry.close()


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_postgres_is_registry_unavailable(closed_port: int) -> None:
    pytest.importorskip("asyncpg")
    registry = DeviceRegistry(create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port}/none"))
    try:
        with pytest.raises(RegistryUnavailableError) as info:
            await registry.list_devices()
    finally:
        await registry.close()

    assert "\n" not in str(info.value)


def test_invalid_database_url() -> None:
    with pytest.raises(RegistryUnavailableError, match="invalid database url"):
        create_engine("not a url")


# -- SQLite specifics -----------------------------------------------------------------------------


async def test_sqlite_connections_use_wal_and_foreign_keys(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        async with engine.connect() as conn:
            journal_mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
            foreign_keys = (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar()
    finally:
        await engine.dispose()

    assert journal_mode == "wal"
    assert foreign_keys == 1


@pytest.fixture
async def two_processes(sqlite_url: str) -> AsyncIterator[tuple[DeviceRegistry, DeviceRegistry]]:
    """Two registries with engines of their own on one SQLite file, like the broker and the CLI."""
    broker = DeviceRegistry(create_engine(sqlite_url))
    cli = DeviceRegistry(create_engine(sqlite_url))
    await upgrade(broker.engine)
    try:
        yield broker, cli
    finally:
        await broker.close()
        await cli.close()


@pytest.mark.slow
async def test_sqlite_writers_on_two_engines_do_not_lock_out(
    two_processes: tuple[DeviceRegistry, DeviceRegistry],
) -> None:
    broker, cli = two_processes
    writes = []
    for n in range(30):
        writes.append(broker.create_device(mac_for(n)))
        writes.append(cli.create_device(mac_for(1000 + n)))

    results = await asyncio.gather(*writes, return_exceptions=True)

    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert (await broker.list_devices()).total == 60
    assert (await cli.list_devices()).total == 60


async def test_sqlite_fold_across_two_engines_loses_no_count(
    two_processes: tuple[DeviceRegistry, DeviceRegistry],
) -> None:
    broker, cli = two_processes
    made = await cli.create_device(MAC)

    await asyncio.gather(
        *(
            reg.record_event(made.id, "refused", actor=Actor.DEVICE, fold=True)
            for _ in range(10)
            for reg in (broker, cli)
        )
    )

    [refused] = [e for e in await cli.events(made.id) if e.kind == "refused"]
    assert refused.count == 20
