"""The operator CLI: in-process through typer's runner, and as the installed ``mqttprov`` script."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from broker.cli import app
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.migrate import head_revision, upgrade
from tests.helpers import free_port, preserved_logging, run_mqttprov, write_config

# A real bcrypt hash shape; the CLI must never print it.
FAKE_HASH = "$2b$04$" + "a" * 53
CONFIG_ERROR = "config error: broker.port: 'abc' is not an integer\n"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Every command reconfigures process-wide logging; give the next test the old set-up back."""
    with preserved_logging():
        yield


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    """A config file pointing at this test's own SQLite database (not yet migrated)."""
    return write_config(tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}})


def invoke(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    """Run the CLI in-process; unexpected exceptions propagate instead of hiding in the result."""
    return CliRunner().invoke(
        app, list(args), env={"COLUMNS": "200", **(env or {})}, input=stdin, catch_exceptions=False
    )


def seed(url: str, *devices: tuple[str, DeviceStatus]) -> list[DeviceInfo]:
    """Migrate the database at ``url`` and create these (MAC, status) devices, oldest first."""

    async def work() -> list[DeviceInfo]:
        registry = DeviceRegistry(create_engine(url))
        try:
            await upgrade(registry.engine)
            return [
                await registry.create_device(
                    mac,
                    status=status,
                    firmware_version="1.2.3",
                    password_hash=FAKE_HASH if status == DeviceStatus.REGISTERED else None,
                )
                for mac, status in devices
            ]
        finally:
            await registry.close()

    return asyncio.run(work())


def lookup(url: str, device_id: uuid.UUID) -> DeviceInfo | None:
    """The device as stored now, or None when it is gone."""

    async def work() -> DeviceInfo | None:
        registry = DeviceRegistry(create_engine(url))
        try:
            page = await registry.list_devices(limit=1000)
        finally:
            await registry.close()
        return next((d for d in page.devices if d.id == device_id), None)

    return asyncio.run(work())


def assert_one_error_line(stderr: str, prefix: str) -> str:
    """stderr is exactly one line starting with ``prefix`` and no traceback; returns that line."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    return lines[0]


# -- version and config ------------------------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == "mqttprov 0.1.0\n"


def test_config_show_renders_valid_toml_with_defaults(config_file: Path, sqlite_url: str) -> None:
    result = invoke("config", "show", "--config", str(config_file))
    assert result.exit_code == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["database"] == {"url": sqlite_url, "pool_size": 5}
    assert shown["broker"]["host"] == "0.0.0.0"
    assert shown["broker"]["port"] == 1883
    assert shown["auth"]["bcrypt_cost"] == 12
    assert "# tls_port is not set" in result.stdout.splitlines()


def test_config_show_json_includes_unset_keys(config_file: Path, sqlite_url: str) -> None:
    result = invoke("config", "show", "--config", str(config_file), "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["database"] == {"url": sqlite_url, "pool_size": 5}
    assert shown["broker"]["tls_port"] is None
    assert shown["broker"]["port"] == 1883
    assert set(shown) >= {"broker", "database", "auth", "provisioning", "acl"}


@pytest.mark.parametrize("as_json", [False, True], ids=["toml", "json"])
def test_config_show_masks_the_database_password(tmp_path: Path, as_json: bool) -> None:
    url = "postgresql+asyncpg://mqtt:s3cr3t-Passw0rd@db.example:5432/mqttprov"
    config = write_config(tmp_path / "pg.toml", {"database": {"url": url}})
    result = invoke("config", "show", "--config", str(config), *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout) if as_json else tomllib.loads(result.stdout)
    assert shown["database"]["url"] == "postgresql+asyncpg://mqtt:***@db.example:5432/mqttprov"
    assert "s3cr3t" not in result.output


def test_config_show_masks_secret_settings(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(
        tmp_path / "secret.toml",
        {
            "database": {"url": sqlite_url},
            "provisioning": {"auth": "fleet_secret", "fleet_secret": "fleet-s3cr3t"},
        },
    )
    for extra in ([], ["--json"]):
        result = invoke("config", "show", "--config", str(config), *extra)
        assert result.exit_code == 0, result.stderr
        shown = json.loads(result.stdout) if extra else tomllib.loads(result.stdout)
        assert shown["provisioning"]["fleet_secret"] == "***"
        assert "fleet-s3cr3t" not in result.output


def test_environment_overrides_the_config_file(config_file: Path, tmp_path: Path) -> None:
    other = f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
    result = invoke(
        "config", "show", "--config", str(config_file), "--json", env={"MQTTPROV_DATABASE__URL": other}
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["database"]["url"] == other


def test_config_error_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[broker]\nport = "abc"\n', encoding="utf-8")
    result = invoke("config", "show", "--config", str(config))
    assert result.exit_code == 2
    assert result.stderr == CONFIG_ERROR
    assert result.stdout == ""


def test_config_error_from_the_environment(config_file: Path) -> None:
    result = invoke("devices", "list", "--config", str(config_file), env={"MQTTPROV_BROKER__PORT": "abc"})
    assert result.exit_code == 2
    assert result.stderr == CONFIG_ERROR


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    result = invoke("devices", "list", "--config", str(missing))
    assert result.exit_code == 2
    assert result.stderr == f"config error: {missing}: no such file\n"


# -- db upgrade --------------------------------------------------------------------------------


def test_db_upgrade_then_already_at_revision(config_file: Path) -> None:
    head = head_revision()
    first = invoke("db", "upgrade", "--config", str(config_file))
    assert first.exit_code == 0, first.stderr
    assert first.stdout == f"database upgraded from empty to revision {head}\n"
    second = invoke("db", "upgrade", "--config", str(config_file))
    assert second.exit_code == 0, second.stderr
    assert second.stdout == f"database already at revision {head}\n"


def test_db_upgrade_json_via_environment(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./mqttprov.toml: only the environment configures the CLI
    env = {"MQTTPROV_DATABASE__URL": sqlite_url}
    first = invoke("db", "upgrade", "--json", env=env)
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout) == {"before": None, "after": head_revision()}
    second = invoke("db", "upgrade", "--json", env=env)
    assert json.loads(second.stdout) == {"before": head_revision(), "after": head_revision()}
    assert (tmp_path / "registry.db").is_file()


# -- devices list ------------------------------------------------------------------------------


def test_devices_list_table(config_file: Path, sqlite_url: str) -> None:
    a, b = seed(
        sqlite_url,
        ("aa:bb:cc:00:00:01", DeviceStatus.PENDING),
        ("aa:bb:cc:00:00:02", DeviceStatus.REGISTERED),
    )
    result = invoke("devices", "list", "--config", str(config_file))
    assert result.exit_code == 0, result.stderr
    assert "devices (2 of 2)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "aa:bb:cc" in line]
    assert len(rows) == 2
    assert str(a.id) in rows[0]
    assert "pending" in rows[0]
    assert str(b.id) in rows[1]
    assert "registered" in rows[1]
    assert "never" in rows[1]


def test_devices_list_json_never_shows_the_hash(config_file: Path, sqlite_url: str) -> None:
    a, b = seed(
        sqlite_url,
        ("aa:bb:cc:00:00:01", DeviceStatus.PENDING),
        ("aa:bb:cc:00:00:02", DeviceStatus.REGISTERED),
    )
    result = invoke("devices", "list", "--config", str(config_file), "--json")
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    assert set(listed) == {"devices", "total", "next_cursor"}
    assert listed["total"] == 2
    assert [d["id"] for d in listed["devices"]] == [str(a.id), str(b.id)]
    assert [d["has_credentials"] for d in listed["devices"]] == [False, True]
    for device in listed["devices"]:
        assert [key for key in device if "hash" in key] == []
    assert FAKE_HASH not in result.stdout


def test_devices_list_filters_by_status(config_file: Path, sqlite_url: str) -> None:
    seed(
        sqlite_url,
        ("aa:bb:cc:00:00:01", DeviceStatus.PENDING),
        ("aa:bb:cc:00:00:02", DeviceStatus.REGISTERED),
        ("aa:bb:cc:00:00:03", DeviceStatus.PENDING),
    )
    result = invoke("devices", "list", "--status", "pending", "--config", str(config_file), "--json")
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["total"] == 2
    assert [d["mac"] for d in listed["devices"]] == ["aa:bb:cc:00:00:01", "aa:bb:cc:00:00:03"]


def test_devices_list_pages_with_limit_and_offset(config_file: Path, sqlite_url: str) -> None:
    made = seed(sqlite_url, *((f"aa:bb:cc:00:00:0{i}", DeviceStatus.PENDING) for i in range(1, 5)))
    result = invoke(
        "devices", "list", "--limit", "2", "--offset", "1", "--config", str(config_file), "--json"
    )
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["total"] == 4
    assert [d["id"] for d in listed["devices"]] == [str(made[1].id), str(made[2].id)]


@pytest.mark.parametrize("option", [["--status", "bogus"], ["--limit", "0"], ["--offset", "-1"]])
def test_devices_list_rejects_bad_options(config_file: Path, option: list[str]) -> None:
    result = invoke("devices", "list", *option, "--config", str(config_file))
    assert result.exit_code == 2
    assert "Invalid value" in result.stderr
    assert result.stdout == ""


# -- devices show ------------------------------------------------------------------------------


@pytest.fixture
def device(sqlite_url: str) -> DeviceInfo:
    """One registered device in this test's database."""
    (made,) = seed(sqlite_url, ("a4:cf:12:34:56:78", DeviceStatus.REGISTERED))
    return made


@pytest.mark.slow
@pytest.mark.parametrize("how", ["id", "mac-dashes", "mac-cisco", "mac-upper", "username"])
def test_devices_show_finds_a_device_however_it_is_named(
    config_file: Path, device: DeviceInfo, how: str
) -> None:
    key = {
        "id": str(device.id),
        "mac-dashes": "a4-cf-12-34-56-78",
        "mac-cisco": "a4cf.1234.5678",
        "mac-upper": "A4CF12345678",
        "username": device.mqtt_username,
    }[how]
    result = invoke("devices", "show", key, "--config", str(config_file))
    assert result.exit_code == 0, result.stderr
    assert str(device.id) in result.stdout
    assert "a4:cf:12:34:56:78" in result.stdout
    assert "recent events" in result.stdout
    assert "created" in result.stdout
    assert FAKE_HASH not in result.stdout


def test_devices_show_json_includes_events(config_file: Path, device: DeviceInfo) -> None:
    result = invoke("devices", "show", device.mac, "--config", str(config_file), "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["device"]["id"] == str(device.id)
    assert shown["device"]["has_credentials"] is True
    assert [key for key in shown["device"] if "hash" in key] == []
    assert [(e["kind"], e["actor"], e["count"]) for e in shown["events"]] == [("created", "system", 1)]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("aa:bb:cc:dd:ee:ff", "error: no device matches 'aa:bb:cc:dd:ee:ff'"),
        ("device_000000000000", "error: no device matches 'device_000000000000'"),
    ],
)
def test_devices_show_unknown_device(config_file: Path, device: DeviceInfo, key: str, message: str) -> None:
    result = invoke("devices", "show", key, "--config", str(config_file))
    assert result.exit_code == 1
    assert result.stderr == message + "\n"
    assert result.stdout == ""


def test_devices_show_unknown_id(config_file: Path, device: DeviceInfo) -> None:
    unknown = uuid.uuid4()
    result = invoke("devices", "show", str(unknown), "--config", str(config_file))
    assert result.exit_code == 1
    assert result.stderr == f"error: no device with id {unknown}\n"


def test_devices_show_bad_mac_text(config_file: Path, device: DeviceInfo) -> None:
    result = invoke("devices", "show", "not-a-mac", "--config", str(config_file))
    assert result.exit_code == 1
    # Not "not a MAC address": it may have been meant as an id or a username (issue 17).
    assert result.stderr == (
        "error: no device matches 'not-a-mac' (give a device id, a MAC address or a username)\n"
    )


# -- devices decommission and delete -----------------------------------------------------------


def test_devices_decommission(config_file: Path, sqlite_url: str, device: DeviceInfo) -> None:
    result = invoke("devices", "decommission", "a4-cf-12-34-56-78", "--config", str(config_file))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"decommissioned {device.id} (a4:cf:12:34:56:78)\n"
    stored = lookup(sqlite_url, device.id)
    assert stored is not None
    assert stored.status == DeviceStatus.DECOMMISSIONED
    assert stored.has_credentials is False


def test_devices_decommission_json_is_idempotent(config_file: Path, device: DeviceInfo) -> None:
    for _ in range(2):
        result = invoke("devices", "decommission", str(device.id), "--config", str(config_file), "--json")
        assert result.exit_code == 0, result.stderr
        done = json.loads(result.stdout)
        assert done["id"] == str(device.id)
        assert done["status"] == "decommissioned"
        assert done["has_credentials"] is False
    shown = json.loads(
        invoke("devices", "show", str(device.id), "--config", str(config_file), "--json").stdout
    )
    assert [e["kind"] for e in shown["events"]] == ["decommissioned", "created"]


def test_devices_delete_with_yes(config_file: Path, sqlite_url: str, device: DeviceInfo) -> None:
    result = invoke(
        "devices", "delete", device.mqtt_username, "--yes", "--config", str(config_file), "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["id"] == str(device.id)
    assert lookup(sqlite_url, device.id) is None
    again = invoke("devices", "show", str(device.id), "--config", str(config_file))
    assert again.exit_code == 1


def test_devices_delete_refuses_without_yes_when_stdin_is_not_a_terminal(
    config_file: Path, sqlite_url: str, device: DeviceInfo
) -> None:
    result = invoke("devices", "delete", device.mac, "--config", str(config_file), stdin="y\n")
    assert result.exit_code == 2
    assert result.stderr == "error: refusing to ask for confirmation: stdin is not a terminal (pass --yes)\n"
    assert lookup(sqlite_url, device.id) is not None


# -- database failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["devices", "list"], ["devices", "show", "aa:bb:cc:dd:ee:ff"], ["db", "upgrade"]]
)
def test_unreachable_database_is_one_line(tmp_path: Path, command: list[str]) -> None:
    url = f"postgresql+asyncpg://mqtt:s3cr3t@127.0.0.1:{free_port()}/mqttprov"
    config = write_config(tmp_path / "pg.toml", {"database": {"url": url}})
    result = invoke(*command, "--config", str(config))
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "error: database")
    assert "s3cr3t" not in result.output


def test_unmigrated_sqlite_database_says_run_db_upgrade(config_file: Path) -> None:
    result = invoke("devices", "list", "--config", str(config_file))
    assert result.exit_code == 1
    assert result.stderr == "error: database is not initialised: run `mqttprov db upgrade`\n"


def test_unmigrated_postgres_database_says_run_db_upgrade(postgres_url: str) -> None:
    result = invoke("devices", "show", "aa:bb:cc:dd:ee:ff", env={"MQTTPROV_DATABASE__URL": postgres_url})
    assert result.exit_code == 1
    assert result.stderr == "error: database is not initialised: run `mqttprov db upgrade`\n"


# -- the installed script ----------------------------------------------------------------------


@pytest.mark.slow
def test_script_loads_no_library_only_other_commands_use() -> None:
    # Every command, `mqttprov serve` included, loads the whole command tree: Alembic (db) and
    # aiohttp (authd) must be imported by the commands that use them, or each broker carries
    # ~20 MB it never uses.
    code = "import sys, broker.cli; print(*sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    loaded = {name.split(".")[0] for name in done.stdout.split()}
    assert "typer" in loaded
    assert not loaded & {"alembic", "mako", "pygments", "aiohttp"}


@pytest.mark.slow
def test_script_version(tmp_path: Path) -> None:
    done = run_mqttprov("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == "mqttprov 0.1.0\n"
    assert done.stderr == ""


@pytest.mark.slow
def test_script_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[broker]\nport = "abc"\n', encoding="utf-8")
    done = run_mqttprov("devices", "list", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == CONFIG_ERROR
    assert done.stdout == ""


@pytest.mark.slow
def test_script_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://mqtt:s3cr3t@127.0.0.1:{free_port()}/mqttprov"
    done = run_mqttprov("devices", "list", cwd=tmp_path, env={"MQTTPROV_DATABASE__URL": url})
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "error: database")
    assert done.stdout == ""


@pytest.mark.slow
def test_script_list_show_decommission(tmp_path: Path, database_url: str) -> None:
    """The operator's round trip as real processes, on SQLite and on PostgreSQL."""
    config = write_config(tmp_path / "mqttprov.toml", {"database": {"url": database_url}})
    (device,) = seed(database_url, ("a4:cf:12:34:56:78", DeviceStatus.REGISTERED))

    listed = run_mqttprov("devices", "list", "--json", "--config", str(config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert json.loads(listed.stdout)["total"] == 1

    shown = run_mqttprov("devices", "show", "A4CF.1234.5678", "--config", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr
    assert str(device.id) in shown.stdout
    assert "registered" in shown.stdout

    done = run_mqttprov(
        "devices", "decommission", device.mqtt_username, "--json", "--config", str(config), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(done.stdout)["status"] == "decommissioned"
    stored = lookup(database_url, device.id)
    assert stored is not None
    assert stored.status == DeviceStatus.DECOMMISSIONED


@pytest.mark.slow
def test_script_db_upgrade_via_environment(tmp_path: Path, database_url: str) -> None:
    env = {"MQTTPROV_DATABASE__URL": database_url}
    first = run_mqttprov("db", "upgrade", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"database upgraded from empty to revision {head_revision()}\n"
    assert "Traceback" not in first.stderr
    unknown = run_mqttprov("devices", "show", "aa:bb:cc:dd:ee:ff", cwd=tmp_path, env=env)
    assert unknown.returncode == 1
    assert unknown.stderr == "error: no device matches 'aa:bb:cc:dd:ee:ff'\n"
