"""Device labels on SQLite and PostgreSQL: validation, set and remove, deleted with their device;
and ``mqttprov devices add --label``, ``devices import`` and ``devices label``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Connection
from typer.testing import CliRunner, Result

from broker.cli import app
from provisioning import DeviceNotFoundError
from provisioning.registry import MAX_LABELS, DeviceRegistry, InvalidLabelError, parse_label, parse_labels
from provisioning.registry.migrate import alembic_config, upgrade
from provisioning.registry.models import DeviceLabel
from tests.helpers import preserved_logging, write_config

MAC = "02:00:00:00:00:01"


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("site=berlin", ("site", "berlin")),
        ("fleet/region=eu-west.1", ("fleet/region", "eu-west.1")),
        ("rack=rack:R12", ("rack", "rack:R12")),
        (" k=v ", ("k", "v")),
        ("0=0", ("0", "0")),
        ("k" * 63 + "=" + "v" * 63, ("k" * 63, "v" * 63)),
    ],
)
def test_valid_labels(text: str, expected: tuple[str, str]) -> None:
    assert parse_label(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("site", "write it as key=value"),
        ("=berlin", "invalid label key ''"),
        ("Site=berlin", "invalid label key 'Site'"),
        ("-site=berlin", "invalid label key"),
        ("k" * 64 + "=v", "invalid label key"),
        ("site=", "invalid label value ''"),
        ("site=ber lin", "invalid label value"),
        ("site=a=b", "invalid label value 'a=b'"),
        ("site=a;b", "invalid label value"),
        ("site=a,b", "invalid label value"),
        ("site=" + "v" * 64, "invalid label value"),
        ("site=béri", "invalid label value"),
        ("si te=x", "invalid label key"),
    ],
)
def test_invalid_labels(text: str, message: str) -> None:
    with pytest.raises(InvalidLabelError, match=message):
        parse_label(text)


def test_a_key_given_twice_with_two_values_is_refused() -> None:
    assert parse_labels(["a=1", "a=1", "b=2"]) == {"a": "1", "b": "2"}
    with pytest.raises(InvalidLabelError, match="'a' is given twice"):
        parse_labels(["a=1", "a=2"])


# -- the registry -------------------------------------------------------------------------------


async def label_rows(registry: DeviceRegistry) -> int:
    async with registry.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(DeviceLabel)) or 0)


async def test_labels_are_set_replaced_and_removed(registry: DeviceRegistry) -> None:
    device = await registry.create_device(MAC)
    assert device.labels == {}

    first = await registry.set_labels(device.id, {"site": "berlin", "rack": "r1"})
    second = await registry.set_labels(device.id, {"rack": "r2", "tier": "gold"}, remove=["site"])

    assert first.labels == {"rack": "r1", "site": "berlin"}
    assert second.labels == {"rack": "r2", "tier": "gold"}
    assert second.updated_at >= device.updated_at
    assert (await registry.get(device.id)).labels == {"rack": "r2", "tier": "gold"}
    assert (await registry.resolve(MAC)).labels == second.labels
    assert (await registry.resolve(device.mqtt_username)).labels == second.labels
    (latest, *_) = await registry.events(device.id)
    assert latest.kind == "labelled"
    assert latest.detail == {"set": {"rack": "r2", "tier": "gold"}, "removed": ["site"]}


async def test_removing_a_missing_key_changes_nothing(registry: DeviceRegistry) -> None:
    device = await registry.create_device(MAC, labels={"a": "1"})

    assert (await registry.set_labels(device.id, {}, remove=["b"])).labels == {"a": "1"}


async def test_labels_are_read_with_pages_and_operator_changes(registry: DeviceRegistry) -> None:
    labelled = await registry.add_allowed(MAC, labels={"site": "berlin"})
    await registry.create_device("02:00:00:00:00:02")

    page = await registry.list_devices()
    approved = await registry.reject(labelled.id)
    gone = await registry.delete(labelled.id)

    assert labelled.labels == {"site": "berlin"}
    assert [d.labels for d in page.devices] == [{"site": "berlin"}, {}]
    assert approved.labels == gone.labels == {"site": "berlin"}


async def test_a_deleted_device_takes_its_labels_along(registry: DeviceRegistry) -> None:
    device = await registry.create_device(MAC, labels={"a": "1", "b": "2"})
    other = await registry.create_device("02:00:00:00:00:02", labels={"a": "1"})

    await registry.delete(device.id)

    assert await label_rows(registry) == 1
    assert (await registry.get(other.id)).labels == {"a": "1"}


async def test_invalid_label_changes_are_refused_and_change_nothing(registry: DeviceRegistry) -> None:
    device = await registry.create_device(MAC, labels={"a": "1"})

    with pytest.raises(InvalidLabelError, match="both set and removed"):
        await registry.set_labels(device.id, {"a": "2"}, remove=["a"])
    with pytest.raises(InvalidLabelError, match="invalid label value"):
        await registry.set_labels(device.id, {"b": "has space"})
    with pytest.raises(InvalidLabelError, match="invalid label key"):
        await registry.set_labels(device.id, {}, remove=["B"])
    with pytest.raises(InvalidLabelError, match="invalid label key"):
        await registry.create_device("02:00:00:00:00:02", labels={"A": "1"})

    assert (await registry.get(device.id)).labels == {"a": "1"}
    assert (await registry.list_devices()).total == 1


async def test_a_device_carries_at_most_max_labels(registry: DeviceRegistry) -> None:
    full = {f"k{n}": "v" for n in range(MAX_LABELS)}
    device = await registry.create_device(MAC, labels=full)

    with pytest.raises(InvalidLabelError, match=f"at most {MAX_LABELS} labels"):
        await registry.set_labels(device.id, {"one": "more"})
    with pytest.raises(InvalidLabelError, match=f"at most {MAX_LABELS} labels"):
        await registry.create_device("02:00:00:00:00:02", labels=full | {"one": "more"})
    # Replacing one is no growth.
    assert (await registry.set_labels(device.id, {"k0": "w"}, remove=["k1"])).labels["k0"] == "w"
    assert len((await registry.set_labels(device.id, {"k1": "v"})).labels) == MAX_LABELS


async def test_labels_of_an_unknown_device(registry: DeviceRegistry) -> None:
    with pytest.raises(DeviceNotFoundError):
        await registry.set_labels(uuid.uuid4(), {"a": "1"})


async def test_migration_0008_upgrades_and_downgrades(registry: DeviceRegistry) -> None:
    engine = registry.engine
    await registry.create_device(MAC, labels={"a": "1"})

    def tables(conn: Connection) -> set[str]:
        return set(inspect(conn).get_table_names())

    def downgrade(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")

    async with engine.begin() as conn:
        await conn.run_sync(downgrade)
        assert "device_labels" not in await conn.run_sync(tables)
    await upgrade(engine, "0008")
    device = await registry.find_by_mac(MAC)
    assert device is not None
    assert device.labels == {}
    assert (await registry.set_labels(device.id, {"b": "2"})).labels == {"b": "2"}


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with preserved_logging():
        yield


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


@pytest.fixture
def config(tmp_path: Path, sqlite_url: str) -> tuple[str, str]:
    path = write_config(tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}})
    assert invoke("db", "upgrade", "--config", str(path)).exit_code == 0
    return ("--config", str(path))


def test_cli_add_with_labels_then_label_and_show(config: tuple[str, str]) -> None:
    added = invoke("devices", "add", MAC, "--label", "site=berlin", "-l", "rack=r1", "--json", *config)
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["labels"] == {"rack": "r1", "site": "berlin"}

    changed = invoke("devices", "label", MAC, "tier=gold", "--remove", "rack", *config)
    assert changed.exit_code == 0, changed.output
    assert changed.stdout.strip().endswith(f"({MAC}): site=berlin tier=gold")

    shown = invoke("devices", "label", MAC, "--json", *config)
    assert json.loads(shown.stdout)["labels"] == {"site": "berlin", "tier": "gold"}
    listed = invoke("devices", "list", *config)
    assert "site=berlin tier=gold" in listed.stdout
    details = invoke("devices", "show", MAC, "--json", *config)
    assert json.loads(details.stdout)["device"]["labels"] == {"site": "berlin", "tier": "gold"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("devices", "add", MAC, "--label", "site"), "error: invalid label 'site': write it as key=value\n"),
        (("devices", "label", MAC, "Site=x"), "error: invalid label key 'Site'"),
        (("devices", "label", MAC, "--remove", "a b"), "error: invalid label key 'a b'"),
    ],
)
def test_cli_bad_labels_exit_2(config: tuple[str, str], args: tuple[str, ...], message: str) -> None:
    result = invoke(*args, *config)

    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.splitlines()) == 1


def test_cli_label_unknown_device_exits_1(config: tuple[str, str]) -> None:
    result = invoke("devices", "label", MAC, "a=1", *config)

    assert result.exit_code == 1
    assert result.stderr == f"error: no device matches '{MAC}'\n"


def test_cli_import_carries_labels(config: tuple[str, str], tmp_path: Path) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text(
        "mac,note,labels\n"
        "02:00:00:00:00:01,first,site=berlin;rack=r1\n"
        "02:00:00:00:00:02,,\n"
        "02:00:00:00:00:03,bad,site=ber lin\n",
        encoding="utf-8",
    )

    result = invoke("devices", "import", str(csv), "--json", *config)

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["imported"] == 2
    assert report["errors"] == [
        {"line": 4, "mac": "02:00:00:00:00:03", "error": "invalid label value 'ber lin'" + _rest()}
    ]
    listed = json.loads(invoke("devices", "list", "--json", *config).stdout)
    assert [d["labels"] for d in listed["devices"]] == [{"rack": "r1", "site": "berlin"}, {}]


def _rest() -> str:
    return ": 1-63 letters, digits, '.', '_', '-', ':' or '/'"
