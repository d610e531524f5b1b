"""``mqttprov db copy``: a registry moved from SQLite to PostgreSQL arrives unchanged, devices keep
their logins on a broker started on the copy, and a failed or refused copy leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, update
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from broker.cli import app
from broker.embedded import BrokerServer
from provisioning.registry import Actor, DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.copy import (
    DERIVED_TABLES,
    DestinationNotEmptyError,
    RegistryCopyError,
    SameDatabaseError,
    copy_registry,
    registry_tables,
    same_database,
)
from provisioning.registry.migrate import current_revision, head_revision, upgrade
from provisioning.registry.models import Device
from provisioning.registry.operators import OperatorStore
from provisioning.topics import parse_rule
from tests.auth_support import ACCOUNT_PASSWORD, PASSWORD, hashed, login_code, settings
from tests.authd_support import authd_settings, migrate, running_authd
from tests.helpers import free_port, preserved_logging, run_mqttprov, write_config
from tests.mosquitto_node import mosquitto_missing, mosquitto_stack
from tests.mqtt_clients import ACCEPTED, NOT_AUTHORIZED, assert_ok, enrol, login, provisioning_broker
from tests.status_counts_support import status_counts_at

# CONNACK for a wrong password (MQTT 3.1.1: "bad user name or password").
BAD_CREDENTIALS = 4
DB_PASSWORD = "pg-secret-Zq81x"
TABLES = {
    "devices",
    "device_events",
    "service_accounts",
    "credential_changes",
    "credential_verifiers",
    "api_tokens",
    "device_labels",
    "operators",
    "operator_sessions",
}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI reconfigures process-wide logging; give the next test the old set-up back."""
    with preserved_logging():
        yield


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time is not UTC (a naive datetime taken for local time shows)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# -- helpers --------------------------------------------------------------------------------------


async def seed(url: str) -> dict[DeviceStatus, uuid.UUID]:
    """A registry with a device in every status, folded events, accounts and credential changes."""
    device_hash, account_hash = await asyncio.gather(
        asyncio.to_thread(hashed, PASSWORD), asyncio.to_thread(hashed, ACCOUNT_PASSWORD)
    )
    engine = create_engine(url)
    await upgrade(engine)
    devices, accounts = DeviceRegistry(engine), AccountRegistry(engine)
    ids: dict[DeviceStatus, uuid.UUID] = {}
    try:
        for n, status in enumerate(DeviceStatus):
            active = status in {DeviceStatus.REGISTERED, DeviceStatus.ONLINE, DeviceStatus.OFFLINE}
            created = await devices.create_device(
                f"02:00:00:00:00:{n:02x}",
                status=DeviceStatus.REGISTERED if status == DeviceStatus.DECOMMISSIONED else status,
                firmware_version=f"1.{n}.0",
                sensor_types=["temperature", "humidity"][: n % 3],
                password_hash=device_hash if active or status == DeviceStatus.DECOMMISSIONED else None,
                note=f"rack {n}" if n % 2 else None,
            )
            if status == DeviceStatus.DECOMMISSIONED:
                await devices.decommission(created.id)
            ids[status] = created.id
        await devices.mark_activated(ids[DeviceStatus.ONLINE])
        for _ in range(4):  # one row, count 4
            await devices.record_event(
                ids[DeviceStatus.REJECTED], "refused", actor=Actor.DEVICE, detail={"code": 5}, fold=True
            )
        await devices.record_event(None, "refused", actor=Actor.DEVICE, mac="02:00:00:00:00:ff", fold=True)
        gone = await devices.create_device("02:00:00:00:01:00", password_hash=device_hash)
        await devices.reset(gone.id)
        await devices.delete(gone.id)  # its events stay, pointing at no device
        await accounts.add("telemetry", account_hash, [parse_rule("subscribe devices/+/telemetry")])
        await accounts.add("ops", account_hash, [parse_rule("publish devices/+/commands")])
        await accounts.rotate("ops", device_hash)
        operators = OperatorStore(engine)
        await operators.start_session(await operators.add("alice", account_hash))
    finally:
        await engine.dispose()
    return ids


def _utc(value: Any) -> Any:
    # SQLite hands datetimes back naive (they are UTC); PostgreSQL hands them back aware.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


async def dump(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every registry table, in primary-key order, datetimes as aware UTC."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return {
                table.name: [
                    {key: _utc(value) for key, value in row._mapping.items()}
                    for row in await conn.execute(select(table).order_by(*table.primary_key.columns))
                ]
                for table in registry_tables()
            }
    finally:
        await engine.dispose()


async def counts(url: str) -> dict[str, int]:
    """Rows per registry table."""
    return {name: len(rows) for name, rows in (await dump(url)).items()}


async def copy(source_url: str, destination_url: str, **kwargs: Any) -> dict[str, int]:
    """:func:`copy_registry` between two URLs, engines disposed afterwards."""
    source, destination = create_engine(source_url), create_engine(destination_url)
    try:
        return await copy_registry(source, destination, **kwargs)
    finally:
        await source.dispose()
        await destination.dispose()


def with_password(url: str) -> str:
    """``url`` with a password (the test server trusts loopback, so any password works)."""
    return make_url(url).set(password=DB_PASSWORD).render_as_string(hide_password=False)


# -- the copy -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("far_from_utc")
async def test_every_row_arrives_unchanged(sqlite_url: str, postgres_url: str) -> None:
    ids = await seed(sqlite_url)
    calls: list[tuple[str, int, int]] = []

    copied = await copy(sqlite_url, postgres_url, chunk_size=3, progress=lambda *c: calls.append(c))

    before, after = await dump(sqlite_url), await dump(postgres_url)
    assert copied == {name: len(rows) for name, rows in before.items()}
    assert set(copied) == TABLES
    assert copied["devices"] == len(DeviceStatus)
    assert after == before
    statuses = {row["id"]: row["status"] for row in after["devices"]}
    assert {statuses[device_id] for device_id in ids.values()} == {s.value for s in DeviceStatus}
    assert max(row["count"] for row in after["device_events"]) == 4  # the folded refusals
    assert all(row["password_hash"].startswith("$2b$04$") for row in after["service_accounts"])
    assert [row["kind"] for row in after["credential_changes"]] == [
        "decommissioned",
        "reset",
        "deleted",
        "rotated",
    ]
    # Progress: each table announced with its total, then chunk by chunk up to it.
    for name, total in copied.items():
        mine = [(done, seen_total) for table, done, seen_total in calls if table == name]
        assert mine[0] == (0, total)
        assert mine[-1] == (total, total)
        assert [done for done, _ in mine] == sorted({done for done, _ in mine})
    assert len([c for c in calls if c[0] == "device_events"]) > 3  # more than one chunk of 3

    engine = create_engine(postgres_url)
    try:
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        # Every table the migrations create is copied (a new one without a model would not be),
        # or derived from the copied ones by the destination's triggers.
        assert names - {"alembic_version"} - DERIVED_TABLES == set(copied)
    finally:
        await engine.dispose()
    # Counted once (by the triggers as the devices arrived), folded to one row per status.
    source, destination = await status_counts_at(sqlite_url), await status_counts_at(postgres_url)
    assert destination.kept == destination.counted == source.kept == source.counted
    assert destination.rows == len(destination.counted)


@pytest.mark.slow
async def test_a_postgres_registry_copies_back_to_sqlite(
    sqlite_url: str, postgres_url: str, tmp_path: Path
) -> None:
    await seed(sqlite_url)
    await copy(sqlite_url, postgres_url)
    back = f"sqlite+aiosqlite:///{tmp_path / 'back.db'}"

    await copy(postgres_url, back, chunk_size=2)

    assert await dump(back) == await dump(sqlite_url)
    copied = await status_counts_at(back)
    assert copied.kept == copied.counted == (await status_counts_at(sqlite_url)).counted


@pytest.mark.slow
async def test_inserts_after_the_copy_take_fresh_ids(sqlite_url: str, postgres_url: str) -> None:
    ids = await seed(sqlite_url)
    copied = await copy(sqlite_url, postgres_url)
    engine = create_engine(postgres_url)
    registry = DeviceRegistry(engine)
    try:
        before = await registry.events(ids[DeviceStatus.ONLINE], limit=1)
        await registry.record_event(ids[DeviceStatus.ONLINE], "noted", actor=Actor.OPERATOR)
        await registry.reset(ids[DeviceStatus.ONLINE])  # an event and a credential change
        created = await registry.create_device("02:00:00:00:02:00")
        newest = await registry.events(ids[DeviceStatus.ONLINE], limit=2)
        assert [event.id for event in newest] == [copied["device_events"] + 2, copied["device_events"] + 1]
        assert newest[-1].id > before[0].id
        assert await registry.last_change_id() == copied["credential_changes"] + 1
        assert (await registry.events(created.id))[0].id == copied["device_events"] + 3
    finally:
        await registry.close()


@pytest.mark.slow
async def test_a_failed_copy_leaves_the_destination_empty(sqlite_url: str, postgres_url: str) -> None:
    await seed(sqlite_url)

    def crash(table: str, done: int, _total: int) -> None:
        if table == "devices" and done > 0:  # tables before it are already inserted
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        await copy(sqlite_url, postgres_url, chunk_size=2, progress=crash)
    assert set((await counts(postgres_url)).values()) == {0}

    # Nothing half-copied: the same copy runs again from the start.
    assert await copy(sqlite_url, postgres_url) == await counts(sqlite_url)


@pytest.mark.slow
async def test_a_count_mismatch_commits_nothing(sqlite_url: str, postgres_url: str) -> None:
    await seed(sqlite_url)
    # The fault: the destination silently drops the folded refusal rows.
    engine = create_engine(postgres_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE FUNCTION drop_refused() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN IF NEW.kind = 'refused' THEN RETURN NULL; END IF; RETURN NEW; END $$"
            )
            await conn.exec_driver_sql(
                "CREATE TRIGGER drop_refused BEFORE INSERT ON device_events "
                "FOR EACH ROW EXECUTE FUNCTION drop_refused()"
            )
    finally:
        await engine.dispose()

    with pytest.raises(RegistryCopyError, match=r"table device_events: source has \d+ row\(s\), destination"):
        await copy(sqlite_url, postgres_url)
    assert set((await counts(postgres_url)).values()) == {0}


async def test_a_destination_without_status_triggers_commits_nothing(sqlite_url: str, tmp_path: Path) -> None:
    await seed(sqlite_url)
    destination = f"sqlite+aiosqlite:///{tmp_path / 'copy.db'}"
    engine = create_engine(destination)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP TRIGGER devices_status_count_insert")
    finally:
        await engine.dispose()

    with pytest.raises(RegistryCopyError, match="wrong device counts per status"):
        await copy(sqlite_url, destination)
    assert set((await counts(destination)).values()) == {0}


@pytest.mark.slow
async def test_a_row_postgres_refuses_is_one_line_without_the_row(sqlite_url: str, postgres_url: str) -> None:
    ids = await seed(sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as conn:  # SQLite does not enforce VARCHAR lengths; PostgreSQL does
            await conn.execute(
                update(Device).where(Device.id == ids[DeviceStatus.ONLINE]).values(note="n" * 300)
            )
    finally:
        await engine.dispose()
    stored = (await dump(sqlite_url))["devices"]

    with pytest.raises(RegistryCopyError) as failed:
        await copy(sqlite_url, postgres_url)
    message = str(failed.value)
    assert message.startswith("destination database error: value too long"), message
    assert "\n" not in message
    assert not any(row["password_hash"] and row["password_hash"] in message for row in stored)
    assert "n" * 300 not in message
    assert set((await counts(postgres_url)).values()) == {0}


@pytest.mark.slow
async def test_a_non_empty_destination_is_refused(sqlite_url: str, postgres_url: str) -> None:
    await seed(sqlite_url)
    engine = create_engine(postgres_url)
    await upgrade(engine)
    account_hash = await asyncio.to_thread(hashed, ACCOUNT_PASSWORD)
    await AccountRegistry(engine).add("already_here", account_hash, [])
    await engine.dispose()

    with pytest.raises(DestinationNotEmptyError, match="table service_accounts has 1 row") as refused:
        await copy(sqlite_url, postgres_url)
    assert refused.value.table == "service_accounts"
    assert await counts(postgres_url) == {name: int(name == "service_accounts") for name in TABLES}


async def test_the_source_must_be_at_this_versions_schema(sqlite_url: str, tmp_path: Path) -> None:
    engine = create_engine(sqlite_url)
    await upgrade(engine, "0002")
    await engine.dispose()
    destination = tmp_path / "copy.db"

    with pytest.raises(RegistryCopyError, match=r"revision 0002.*mqttprov db upgrade"):
        await copy(sqlite_url, f"sqlite+aiosqlite:///{destination}")
    assert not destination.exists()


async def test_a_missing_source_file_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    with pytest.raises(RegistryCopyError, match=r"typo\.db does not exist"):
        await copy(f"sqlite+aiosqlite:///{missing}", f"sqlite+aiosqlite:///{tmp_path / 'copy.db'}")
    assert not missing.exists()


async def test_the_same_database_is_refused(sqlite_url: str) -> None:
    await seed(sqlite_url)
    with pytest.raises(SameDatabaseError):
        await copy(sqlite_url, sqlite_url)


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("postgresql+asyncpg://a:x@127.0.0.1/reg", "postgresql+asyncpg://b@localhost:5432/reg", True),
        ("postgresql+asyncpg://a@db/reg", "postgresql+asyncpg://a@db/reg2", False),
        ("postgresql+asyncpg://a@db/reg", "postgresql+asyncpg://a@db:5433/reg", False),
        ("sqlite+aiosqlite:///reg.db", "sqlite+aiosqlite:///./reg.db", True),
        ("sqlite+aiosqlite:///reg.db", "postgresql+asyncpg://a@db/reg.db", False),
        ("sqlite+aiosqlite://", "sqlite+aiosqlite://", False),
        ("postgresql+asyncpg://a@db:notaport/reg", "postgresql+asyncpg://a@db:notaport/reg", False),
    ],
)
def test_same_database(first: str, second: str, same: bool) -> None:
    assert same_database(first, second) is same


# -- devices keep their logins --------------------------------------------------------------------


async def enrolled_then_copied(sqlite_url: str, postgres_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two devices enrolled over MQTT on the embedded broker (SQLite), the second decommissioned,
    the broker stopped, the registry copied to PostgreSQL; their ``ok`` replies."""
    async with provisioning_broker(sqlite_url) as embedded:
        creds = await enrol(embedded, "02:00:00:00:03:01")
        gone = await enrol(embedded, "02:00:00:00:03:02")
        await embedded.registry.decommission(uuid.UUID(gone["device_id"]))
    await copy(sqlite_url, postgres_url)
    return creds, gone


@pytest.mark.slow
async def test_an_enrolled_device_logs_in_on_a_broker_over_the_copy(
    sqlite_url: str, postgres_url: str
) -> None:
    creds, gone = await enrolled_then_copied(sqlite_url, postgres_url)

    async with BrokerServer(settings(postgres_url)) as server:
        port = server.settings.broker.port
        record = await server.registry.find_credentials_by_username(creds["mqtt_username"])
        assert record is not None
        assert str(record.device.id) == creds["device_id"]

        def code(login: dict[str, Any], password: str) -> int:
            return login_code(
                port, login["mqtt_client_id"], username=login["mqtt_username"], password=password
            )

        assert await asyncio.to_thread(code, creds, creds["mqtt_password"]) == ACCEPTED
        assert await asyncio.to_thread(code, creds, creds["mqtt_password"][::-1]) == BAD_CREDENTIALS
        assert await asyncio.to_thread(code, gone, gone["mqtt_password"]) != ACCEPTED
        # And the copy takes new devices: ids and usernames do not collide.
        fresh = await enrol(server, "02:00:00:00:03:03")
        assert await asyncio.to_thread(code, fresh, fresh["mqtt_password"]) == ACCEPTED


# -- the command ----------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    """Run the CLI in-process (stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


def assert_one_line_error(result: Result, exit_code: int, *expected: str) -> str:
    """A refusal: this exit code, nothing on stdout, one line on stderr, no traceback, no password."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert DB_PASSWORD not in result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    """A configuration whose ``database.url`` is this test's SQLite file."""
    return write_config(tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}})


@pytest.mark.slow
def test_the_command_as_a_process(
    tmp_path: Path, config_file: Path, sqlite_url: str, postgres_url: str
) -> None:
    asyncio.run(seed(sqlite_url))
    result = run_mqttprov(
        "db",
        "copy",
        "--to",
        with_password(postgres_url),
        "--config",
        str(config_file),
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"tables": asyncio.run(counts(sqlite_url))}
    assert DB_PASSWORD not in result.stdout + result.stderr
    assert asyncio.run(dump(postgres_url)) == asyncio.run(dump(sqlite_url))


def test_the_command_for_people(config_file: Path, sqlite_url: str, postgres_url: str) -> None:
    asyncio.run(seed(sqlite_url))
    result = invoke("db", "copy", "--to", with_password(postgres_url), "--config", str(config_file))
    assert result.exit_code == 0, result.stderr
    assert DB_PASSWORD not in result.stdout + result.stderr
    for name, rows in asyncio.run(counts(sqlite_url)).items():
        assert any(line.split() == ["│", name, "│", str(rows), "│"] for line in result.stdout.splitlines())
    assert f"to {with_password(postgres_url).replace(DB_PASSWORD, '***')};" in result.stdout
    assert "row counts verified" in result.stdout


@pytest.mark.slow
def test_the_command_refuses_a_non_empty_destination(
    config_file: Path, sqlite_url: str, postgres_url: str
) -> None:
    asyncio.run(seed(sqlite_url))
    first = invoke("db", "copy", "--to", with_password(postgres_url), "--config", str(config_file), "--json")
    assert first.exit_code == 0, first.stderr
    again = invoke("db", "copy", "--to", with_password(postgres_url), "--config", str(config_file), "--json")
    assert_one_line_error(again, 1, "not empty", "table credential_changes has")
    assert asyncio.run(counts(postgres_url)) == json.loads(first.stdout)["tables"]


def test_the_command_refuses_its_own_source(config_file: Path, sqlite_url: str) -> None:
    asyncio.run(migrate(sqlite_url))
    result = invoke("db", "copy", "--to", sqlite_url, "--config", str(config_file))
    assert_one_line_error(result, 2, "is the configured database itself")


@pytest.mark.parametrize(
    ("url", "exit_code", "expected"),
    [
        (f"postgresql+asyncpg://postgres:{DB_PASSWORD}@127.0.0.1:{free_port()}/x", 1, "destination database"),
        (f"postgresql+asyncpg://postgres:{DB_PASSWORD}@127.0.0.1:port/x", 2, "not a database URL"),
        (f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1/x", 2, "not a database URL"),
        ("not a url", 2, "not a database URL"),
    ],
    ids=["unreachable", "bad-port", "sync-driver", "garbage"],
)
def test_the_command_fails_in_one_line(
    config_file: Path, sqlite_url: str, url: str, exit_code: int, expected: str
) -> None:
    asyncio.run(migrate(sqlite_url))
    assert_one_line_error(
        invoke("db", "copy", "--to", url, "--config", str(config_file)), exit_code, expected
    )


def test_the_command_reports_an_unknown_database_without_its_password(
    config_file: Path, sqlite_url: str, postgres_url: str
) -> None:
    asyncio.run(migrate(sqlite_url))
    missing = make_url(with_password(postgres_url)).set(database="mqttprov_no_such_database")
    result = invoke(
        "db", "copy", "--to", missing.render_as_string(hide_password=False), "--config", str(config_file)
    )
    assert_one_line_error(result, 1, 'destination database error: database "mqttprov_no_such_database"')


@pytest.mark.slow
async def test_an_enrolled_device_logs_in_through_authd_over_the_copy(
    sqlite_url: str, postgres_url: str
) -> None:
    creds, gone = await enrolled_then_copied(sqlite_url, postgres_url)

    async with running_authd(authd_settings(postgres_url)) as (_, client):
        user, password = creds["mqtt_username"], creds["mqtt_password"]
        assert await client.rabbit_user(user, password, user) == "allow"
        assert await client.rabbit_user(user, password[::-1], user) == "deny"
        gone_user = gone["mqtt_username"]
        assert await client.rabbit_user(gone_user, gone["mqtt_password"], gone_user) == "deny"
        emqx = {"clientid": user, "username": user, "password": password, "peerhost": "127.0.0.1"}
        assert (await client.json("/emqx/authn", emqx)).json()["result"] == "allow"


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing()))
async def test_a_copied_device_re_enrols_on_mosquitto_after_bridge_sync(
    tmp_path: Path, sqlite_url: str, postgres_url: str
) -> None:
    mac = "02:00:00:00:04:01"
    async with provisioning_broker(sqlite_url) as embedded:
        old = await enrol(embedded, mac)
        assert await asyncio.to_thread(login, embedded.settings.broker.port, old) == ACCEPTED
    await copy(sqlite_url, postgres_url)

    async with mosquitto_stack(tmp_path, postgres_url) as stack:
        device_port, provision_port = stack.node.device_port, stack.node.provision_port
        # Mosquitto cannot take the bcrypt hash: the device listener refuses the old login...
        assert await asyncio.to_thread(login, device_port, old) == NOT_AUTHORIZED
        # ...while the anonymous provisioning listener lets any login in (hence two addresses).
        assert await asyncio.to_thread(login, provision_port, old) == ACCEPTED
        # An active device asking again before the sync is refused: the reset is what lets it.
        before = await asyncio.to_thread(stack.provision, mac)
        assert before is not None
        assert before["error_code"] == "ALREADY_PROVISIONED"

        synced = await asyncio.to_thread(stack.cli, "bridge", "sync", "--grace", "0", "--json")
        assert synced.returncode == 0, synced.stderr
        assert [(s["action"], s["username"]) for s in json.loads(synced.stdout)["steps"]] == [
            ("reset_device", old["mqtt_username"])
        ]

        # The firmware rule: refused, so it provisions again, and is sent to the device listener.
        new = await asyncio.to_thread(stack.provision, mac)
        assert new is not None
        assert_ok(new)
        assert (new["device_id"], new["mqtt_username"]) == (old["device_id"], old["mqtt_username"])
        assert new["mqtt_password"] != old["mqtt_password"]
        assert (new["mqtt_host"], new["mqtt_port"]) == ("127.0.0.1", device_port)
        assert await asyncio.to_thread(login, device_port, new) == ACCEPTED
        assert await asyncio.to_thread(login, device_port, old) == NOT_AUTHORIZED


def test_a_port_that_is_not_a_number_is_one_line(config_file: Path) -> None:
    # make_url raises ValueError, not ArgumentError, for it: once an "internal error".
    url = f"postgresql+asyncpg://postgres:{DB_PASSWORD}@127.0.0.1:notaport/x"
    result = CliRunner().invoke(
        app, ["db", "upgrade", "--config", str(config_file)], env={"MQTTPROV_DATABASE__URL": url}
    )
    assert_one_line_error(result, 1, "invalid database url")
