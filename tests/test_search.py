"""Device search and export on SQLite and PostgreSQL: every filter, exact totals, cursors, chunks;
and ``mqttprov devices list`` with filters and ``devices export``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import update
from typer.testing import CliRunner, Result

import provisioning.registry.search
from broker.cli import app
from provisioning import ProvisioningError
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus
from provisioning.registry.models import Device
from provisioning.registry.search import LABELS_DRIVE_MAX, MAX_PAGE, DeviceFilter, InvalidFilterError
from tests.helpers import preserved_logging, write_config

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


async def place(
    registry: DeviceRegistry, device: DeviceInfo, created: datetime, seen: datetime | None = None
) -> None:
    """Give a device a creation (and last-seen) time of the test's choosing."""
    async with registry.engine.begin() as conn:
        await conn.execute(
            update(Device).where(Device.id == device.id).values(created_at=created, last_seen_at=seen)
        )


@pytest.fixture
async def fleet(registry: DeviceRegistry) -> list[DeviceInfo]:
    """Three devices, created an hour apart, with statuses, labels and last-seen times."""
    one = await registry.create_device("02:00:00:00:00:01", labels={"site": "berlin", "tier": "gold"})
    two = await registry.create_device(
        "02:00:00:00:01:02", status=DeviceStatus.APPROVED, labels={"site": "berlin"}
    )
    three = await registry.create_device(
        "0a:00:00:00:00:03", status=DeviceStatus.ONLINE, labels={"site": "paris", "tier": "gold"}
    )
    await place(registry, one, T0)
    await place(registry, two, T0 + HOUR, T0 + 2 * HOUR)
    await place(registry, three, T0 + 2 * HOUR, T0 + 3 * HOUR)
    return [one, two, three]


async def found(registry: DeviceRegistry, **fields: object) -> list[int]:
    """The fleet positions (1-3) of the devices matching ``DeviceFilter(**fields)``; checks the total."""
    page = await registry.search_devices(DeviceFilter.model_validate(fields))
    assert page.total == len(page.devices)
    return [int(d.mac[-1]) for d in page.devices]


async def test_no_filter_lists_everything_oldest_first(
    registry: DeviceRegistry, fleet: list[DeviceInfo]
) -> None:
    page = await registry.search_devices()

    assert [d.id for d in page.devices] == [d.id for d in fleet]
    assert page.total == 3
    assert page.devices[0].labels == {"site": "berlin", "tier": "gold"}


async def test_status_is_any_of(registry: DeviceRegistry, fleet: list[DeviceInfo]) -> None:
    assert await found(registry, status=["approved"]) == [2]
    assert await found(registry, status=["approved", "online"]) == [2, 3]
    assert await found(registry, status=["offline"]) == []


@pytest.mark.parametrize("drive_max", [0, LABELS_DRIVE_MAX], ids=["from-devices", "from-labels"])
async def test_labels_are_all_of(
    registry: DeviceRegistry, fleet: list[DeviceInfo], monkeypatch: pytest.MonkeyPatch, drive_max: int
) -> None:
    # Both ways a page may be found (SQLite picks by how many devices carry the labels).
    monkeypatch.setattr(provisioning.registry.search, "LABELS_DRIVE_MAX", drive_max)
    assert await found(registry, labels={"site": "berlin"}, status=["pending", "approved"]) == [1, 2]
    assert await found(registry, labels={"site": "paris"}, search="0a") == [3]
    assert await found(registry, labels={"site": "berlin"}) == [1, 2]
    assert await found(registry, labels={"tier": "gold"}) == [1, 3]
    assert await found(registry, labels={"site": "berlin", "tier": "gold"}) == [1]
    assert await found(registry, labels={"site": "berlin"}, status=["online"]) == []


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("02", [1, 2]),
        ("02:00:00:00:01", [2]),
        ("02-00-00-00-01", [2]),
        ("0200.0000.01", [2]),
        ("020000000102", [2]),
        ("0A", [3]),
        ("0a:00:00:00:00:03", [3]),
        ("03:", []),
        ("zz", []),
        ("%", []),
        ("_", []),
    ],
)
async def test_search_by_mac_prefix_in_any_notation(
    registry: DeviceRegistry, fleet: list[DeviceInfo], search: str, expected: list[int]
) -> None:
    assert await found(registry, search=search) == expected


async def test_search_by_id_and_username(registry: DeviceRegistry, fleet: list[DeviceInfo]) -> None:
    three = fleet[2]

    assert await found(registry, search=str(three.id)) == [3]
    assert await found(registry, search=three.id.hex[:8]) == [3]
    assert await found(registry, search=str(three.id)[:11]) == [3]  # with its dash
    assert await found(registry, search=three.mqtt_username) == [3]
    assert await found(registry, search=three.mqtt_username.upper()[:10]) == [3]
    assert await found(registry, search="device_") == [1, 2, 3]
    assert await found(registry, search=str(uuid.uuid4())) == []


async def test_time_ranges(registry: DeviceRegistry, fleet: list[DeviceInfo]) -> None:
    assert await found(registry, created_from=T0 + HOUR) == [2, 3]
    assert await found(registry, created_until=T0 + HOUR) == [1]
    assert await found(registry, created_from=T0, created_until=T0 + 2 * HOUR) == [1, 2]
    assert await found(registry, seen_from=T0 + 3 * HOUR) == [3]
    assert await found(registry, seen_until=T0 + 3 * HOUR) == [2]
    # A naive time is UTC.
    assert await found(registry, created_from=datetime(2026, 1, 1, 1)) == [2, 3]  # noqa: DTZ001


async def test_pages_by_offset_and_cursor(registry: DeviceRegistry, fleet: list[DeviceInfo]) -> None:
    gold = DeviceFilter(labels={"tier": "gold"})

    first = await registry.search_devices(limit=2)
    second = await registry.search_devices(limit=2, after=first.next_cursor)
    by_offset = await registry.search_devices(limit=2, offset=2)
    gold_first = await registry.search_devices(gold, limit=1)
    gold_second = await registry.search_devices(gold, limit=1, after=gold_first.next_cursor)

    assert [d.id for d in first.devices] == [fleet[0].id, fleet[1].id]
    assert first.next_cursor is not None
    assert [d.id for d in second.devices] == [d.id for d in by_offset.devices] == [fleet[2].id]
    assert second.next_cursor is None
    assert first.total == second.total == 3
    assert [d.id for d in gold_second.devices] == [fleet[2].id]
    assert gold_second.total == 2


@pytest.mark.parametrize("cursor", ["", "nonsense", "bm8gYmFy", "MjAyNnxub3QtYW4taWQ"])
async def test_a_damaged_cursor_is_refused(registry: DeviceRegistry, cursor: str) -> None:
    with pytest.raises(InvalidFilterError, match="invalid cursor"):
        await registry.search_devices(after=cursor)


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (MAX_PAGE + 1, 0), (10, -1)])
async def test_page_bounds(registry: DeviceRegistry, limit: int, offset: int) -> None:
    with pytest.raises(ProvisioningError):
        await registry.search_devices(limit=limit, offset=offset)


async def test_list_devices_keeps_its_counted_total(
    registry: DeviceRegistry, fleet: list[DeviceInfo]
) -> None:
    page = await registry.list_devices(status=DeviceStatus.APPROVED)

    assert [d.id for d in page.devices] == [fleet[1].id]
    assert page.total == 1


async def test_export_streams_every_match_in_chunks(registry: DeviceRegistry) -> None:
    made = [
        await registry.create_device(f"02:00:00:00:02:{n:02x}", labels={"n": str(n % 2)}) for n in range(7)
    ]
    for n, device in enumerate(made):
        await place(registry, device, T0 + n * HOUR)

    everything = [d async for d in registry.export_devices(chunk=3)]
    odd = [d async for d in registry.export_devices(DeviceFilter(labels={"n": "1"}), chunk=2)]
    none = [d async for d in registry.export_devices(DeviceFilter(status=frozenset({DeviceStatus.ONLINE})))]

    assert [d.id for d in everything] == [d.id for d in made]
    assert [d.id for d in odd] == [made[1].id, made[3].id, made[5].id]
    assert all(d.labels == {"n": "1"} for d in odd)
    assert none == []


@pytest.mark.parametrize(
    "fields",
    [
        {"labels": {"Site": "x"}},
        {"labels": {"site": "a b"}},
        {"search": ""},
        {"search": "x" * 65},
        {"status": ["lost"]},
        {"colour": "red"},
    ],
)
def test_invalid_filters_are_refused_at_the_boundary(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DeviceFilter.model_validate(fields)


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
    for n, labels in enumerate([["site=berlin", "tier=gold"], ["site=berlin"], ["site=paris"]], start=1):
        args = [f"02:00:00:00:00:0{n}"] + [f"--label={label}" for label in labels]
        assert invoke("devices", "add", *args, "--config", str(path)).exit_code == 0
    return ("--config", str(path))


def test_cli_list_filters(config: tuple[str, str]) -> None:
    result = invoke("devices", "list", "--label", "site=berlin", "-l", "tier=gold", "--json", *config)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["mac"] for d in data["devices"]] == ["02:00:00:00:00:01"]
    assert data["total"] == 1

    searched = json.loads(invoke("devices", "list", "--search", "0200.0000.000", "--json", *config).stdout)
    assert searched["total"] == 3
    paged = json.loads(invoke("devices", "list", "--limit", "2", "--json", *config).stdout)
    assert paged["next_cursor"] is not None
    rest = invoke("devices", "list", "--after", paged["next_cursor"], "--json", *config)
    assert [d["mac"] for d in json.loads(rest.stdout)["devices"]] == ["02:00:00:00:00:03"]
    recent = invoke(
        "devices", "list", "--created-from", "2000-01-01", "--status", "approved", "--json", *config
    )
    assert json.loads(recent.stdout)["total"] == 3


def test_cli_list_bad_filters_exit_2(config: tuple[str, str]) -> None:
    bad_label = invoke("devices", "list", "--label", "Site=x", *config)
    bad_cursor = invoke("devices", "list", "--after", "nonsense", *config)

    assert bad_label.exit_code == 2
    assert bad_label.stderr.startswith("error: invalid label key 'Site'")
    assert bad_cursor.exit_code == 1
    assert bad_cursor.stderr == "error: invalid cursor: pass a page's next_cursor unchanged\n"


def test_cli_export_csv_and_jsonl(config: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "berlin.csv"
    result = invoke("devices", "export", "--label", "site=berlin", "--output", str(out), *config)
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("id,mac,mqtt_username,status,")
    assert len(lines) == 3
    assert lines[1].endswith(",site=berlin;tier=gold")

    jsonl = invoke("devices", "export", "--format", "jsonl", "--search", "02:00:00:00:00:03", *config)
    assert jsonl.exit_code == 0, jsonl.output
    (record,) = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert record["labels"] == {"site": "paris"}
