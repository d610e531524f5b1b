"""Enrolment commands: devices add/import/approve/reject/reset, keys derive, provision-device."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from broker.cli import app
from broker.embedded import BrokerServer
from config import ProvisioningSettings
from provisioning.keys import derive_device_key
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.migrate import upgrade
from tests.helpers import (
    broker_settings,
    connack_code,
    free_port,
    mqttprov_executable,
    preserved_logging,
    run_mqttprov,
    write_config,
)

FAKE_HASH = "$2b$04$" + "a" * 53
MASTER_SECRET = "factory-master-s3cret"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands reconfigure process-wide logging; give the next test the old set-up back."""
    with preserved_logging():
        yield


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    """A config file pointing at this test's own, migrated SQLite database."""
    asyncio.run(_migrate(sqlite_url))
    return write_config(tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}})


async def _migrate(url: str) -> None:
    registry = DeviceRegistry(create_engine(url))
    try:
        await upgrade(registry.engine)
    finally:
        await registry.close()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process; unexpected exceptions propagate."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False)


def devices(config: Path, *args: str) -> Result:
    """``mqttprov devices ARGS --config CONFIG``."""
    return invoke("devices", *args, "--config", str(config))


def seed(url: str, *devices: tuple[str, DeviceStatus]) -> list[DeviceInfo]:
    """Create these (MAC, status) devices (registered ones with a password hash)."""

    async def work() -> list[DeviceInfo]:
        registry = DeviceRegistry(create_engine(url))
        try:
            return [
                await registry.create_device(
                    mac, status=status, password_hash=FAKE_HASH if status is DeviceStatus.REGISTERED else None
                )
                for mac, status in devices
            ]
        finally:
            await registry.close()

    return asyncio.run(work())


def stored(url: str) -> dict[str, DeviceInfo]:
    """Every device in the registry, by MAC."""

    async def work() -> dict[str, DeviceInfo]:
        registry = DeviceRegistry(create_engine(url))
        try:
            page = await registry.list_devices(limit=1000)
        finally:
            await registry.close()
        return {d.mac: d for d in page.devices}

    return asyncio.run(work())


def one_error_line(result: Result, code: int, prefix: str) -> str:
    """The command failed with ``code`` and exactly one stderr line starting with ``prefix``."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- devices add -------------------------------------------------------------------------------


def test_add_then_list_shows_the_device_approved(config_file: Path) -> None:
    added = devices(
        config_file, "add", "AA-BB-CC-DD-EE-01", "--firmware", "1.0", "--note", "rack 3", "--json"
    )
    assert added.exit_code == 0, added.stderr
    device = json.loads(added.stdout)
    assert (device["mac"], device["status"], device["firmware_version"], device["note"]) == (
        "aa:bb:cc:dd:ee:01",
        "approved",
        "1.0",
        "rack 3",
    )
    listed = json.loads(devices(config_file, "list", "--json").stdout)
    assert listed["total"] == 1
    assert listed["devices"][0]["id"] == device["id"]
    assert listed["devices"][0]["status"] == "approved"


def test_add_duplicate_and_bad_mac_fail_with_one_line(config_file: Path, sqlite_url: str) -> None:
    first = devices(config_file, "add", "aa:bb:cc:dd:ee:01")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith("added aa:bb:cc:dd:ee:01 as ")
    duplicate = devices(config_file, "add", "AABBCCDDEE01")
    assert one_error_line(duplicate, 1, "error: ") == (
        "error: a device with MAC aa:bb:cc:dd:ee:01 already exists"
    )
    bad = devices(config_file, "add", "aa:bb:cc:dd:ee")
    one_error_line(bad, 2, "error: not a MAC address: 'aa:bb:cc:dd:ee'")  # a bad command line
    too_long = devices(config_file, "add", "aa:bb:cc:dd:ee:02", "--firmware", "x" * 65)
    one_error_line(too_long, 2, "error: firmware is longer than 64 characters")
    assert list(stored(sqlite_url)) == ["aa:bb:cc:dd:ee:01"]


# -- devices import ----------------------------------------------------------------------------

MIXED_CSV = (
    "\ufeffMAC , Firmware,note\n"  # a spreadsheet's BOM and sloppy header
    "aa:bb:cc:dd:ee:01,1.0,first\n"
    "not-a-mac,1.0,\n"
    "AA-BB-CC-DD-EE-01,,again\n"
    "aa:bb:cc:dd:ee:09,,\n"
    "\n"
    "aabb.ccdd.ee02,2.0,\n"
    ",,\n"
)
MIXED_ERRORS = [
    {"line": 3, "mac": "not-a-mac", "error": "invalid MAC"},
    {"line": 4, "mac": "AA-BB-CC-DD-EE-01", "error": "duplicate in file"},
    {"line": 5, "mac": "aa:bb:cc:dd:ee:09", "error": "already registered"},
    {"line": 8, "mac": "", "error": "invalid MAC"},
]


def test_import_reports_every_bad_line_and_adds_the_rest(
    config_file: Path, sqlite_url: str, tmp_path: Path
) -> None:
    seed(sqlite_url, ("aa:bb:cc:dd:ee:09", DeviceStatus.PENDING))
    source = tmp_path / "devices.csv"
    source.write_text(MIXED_CSV, encoding="utf-8")
    result = devices(config_file, "import", str(source))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "line 3: not-a-mac: invalid MAC",
        "line 4: AA-BB-CC-DD-EE-01: duplicate in file",
        "line 5: aa:bb:cc:dd:ee:09: already registered",
        "line 8: (empty): invalid MAC",
    ]
    assert result.stdout == "imported 2, skipped 4\n"
    now = stored(sqlite_url)
    assert set(now) == {"aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02", "aa:bb:cc:dd:ee:09"}
    first = now["aa:bb:cc:dd:ee:01"]
    assert (first.status, first.firmware_version, first.note) == (DeviceStatus.APPROVED, "1.0", "first")
    assert (now["aa:bb:cc:dd:ee:02"].firmware_version, now["aa:bb:cc:dd:ee:02"].note) == ("2.0", None)
    assert now["aa:bb:cc:dd:ee:09"].status is DeviceStatus.PENDING


def test_import_json_reports_the_same_errors(config_file: Path, sqlite_url: str, tmp_path: Path) -> None:
    seed(sqlite_url, ("aa:bb:cc:dd:ee:09", DeviceStatus.PENDING))
    source = tmp_path / "devices.csv"
    source.write_text(MIXED_CSV, encoding="utf-8")
    result = devices(config_file, "import", str(source), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"imported": 2, "errors": MIXED_ERRORS}
    assert result.stderr == ""


@pytest.mark.slow
def test_import_of_a_clean_file_exits_zero(config_file: Path, sqlite_url: str, tmp_path: Path) -> None:
    source = tmp_path / "clean.csv"
    source.write_text("mac\n" + "".join(f"02:00:00:00:{i // 256:02x}:{i % 256:02x}\n" for i in range(300)))
    result = devices(config_file, "import", str(source))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "imported 300, skipped 0\n"
    assert len(stored(sqlite_url)) == 300


def test_import_refuses_unusable_files_with_exit_2(
    config_file: Path, sqlite_url: str, tmp_path: Path
) -> None:
    no_column = tmp_path / "no-mac.csv"
    no_column.write_text("address,firmware\naa:bb:cc:dd:ee:01,1.0\n", encoding="utf-8")
    assert one_error_line(devices(config_file, "import", str(no_column)), 2, "error: ") == (
        f"error: {no_column}: no 'mac' column in the header line"
    )
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    one_error_line(devices(config_file, "import", str(empty)), 2, f"error: {empty}: no 'mac' column")
    missing = tmp_path / "missing.csv"
    assert one_error_line(devices(config_file, "import", str(missing)), 2, "error: ") == (
        f"error: {missing}: no such file"
    )
    assert stored(sqlite_url) == {}


# -- approve, reject, reset --------------------------------------------------------------------


def test_approve_reject_and_reset_move_a_device_through_its_states(
    config_file: Path, sqlite_url: str
) -> None:
    pending, registered = seed(
        sqlite_url,
        ("aa:bb:cc:dd:ee:01", DeviceStatus.PENDING),
        ("aa:bb:cc:dd:ee:02", DeviceStatus.REGISTERED),
    )
    approved = devices(config_file, "approve", "AA:BB:CC:DD:EE:01", "--json")
    assert approved.exit_code == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "approved"
    rejected = devices(config_file, "reject", str(pending.id))
    assert rejected.exit_code == 0, rejected.stderr
    assert rejected.stdout == f"rejected {pending.id} (aa:bb:cc:dd:ee:01): now rejected\n"
    again = devices(config_file, "approve", pending.mqtt_username)
    assert again.exit_code == 0, again.stderr
    assert stored(sqlite_url)["aa:bb:cc:dd:ee:01"].status is DeviceStatus.APPROVED

    assert registered.has_credentials
    reset = devices(config_file, "reset", "aa:bb:cc:dd:ee:02", "--json")
    assert reset.exit_code == 0, reset.stderr
    shown = json.loads(reset.stdout)
    assert (shown["status"], shown["has_credentials"]) == ("registered", False)
    assert not stored(sqlite_url)["aa:bb:cc:dd:ee:02"].has_credentials


def test_invalid_transitions_fail_with_the_registry_message(config_file: Path, sqlite_url: str) -> None:
    registered, gone = seed(
        sqlite_url,
        ("aa:bb:cc:dd:ee:01", DeviceStatus.REGISTERED),
        ("aa:bb:cc:dd:ee:02", DeviceStatus.DECOMMISSIONED),
    )
    assert one_error_line(devices(config_file, "approve", "aa:bb:cc:dd:ee:01"), 1, "error: ") == (
        f"error: device {registered.id} is registered; it cannot be approved"
    )
    assert one_error_line(devices(config_file, "reject", "aa:bb:cc:dd:ee:01"), 1, "error: ") == (
        f"error: device {registered.id} is registered; it cannot be rejected"
    )
    assert one_error_line(devices(config_file, "reset", "aa:bb:cc:dd:ee:02"), 1, "error: ") == (
        f"error: device {gone.id} is decommissioned; it cannot be reset"
    )
    one_error_line(devices(config_file, "approve", "aa:bb:cc:dd:ee:77"), 1, "error: no device matches")
    assert stored(sqlite_url)["aa:bb:cc:dd:ee:01"].has_credentials


# -- keys derive -------------------------------------------------------------------------------


def test_keys_derive_prints_only_the_device_key(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./mqttprov.toml: the secret comes from the environment
    config = write_config(
        tmp_path / "factory.toml",
        {"database": {"url": sqlite_url}, "provisioning": {"device_key_secret": MASTER_SECRET}},
    )
    result = invoke("keys", "derive", "AA-BB-CC-DD-EE-01", "--config", str(config))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == derive_device_key(MASTER_SECRET, "aa:bb:cc:dd:ee:01") + "\n"
    assert result.stderr == ""
    from_env = invoke(
        "keys", "derive", "aabbccddee02", env={"MQTTPROV_PROVISIONING__DEVICE_KEY_SECRET": "other"}
    )
    assert from_env.stdout == derive_device_key("other", "aa:bb:cc:dd:ee:02") + "\n"
    one_error_line(invoke("keys", "derive", "nope", "--config", str(config)), 2, "error: not a MAC address")


def test_keys_derive_without_a_secret_exits_2(config_file: Path) -> None:
    result = invoke("keys", "derive", "aa:bb:cc:dd:ee:01", "--config", str(config_file))
    assert one_error_line(result, 2, "") == "error: provisioning.device_key_secret is not set"
    assert result.stdout == ""


# -- provision-device --------------------------------------------------------------------------


def provision_args(server: BrokerServer, mac: str) -> list[str]:
    """``provision-device`` pointed at ``server`` for ``mac``."""
    address = server.settings.broker
    return ["provision-device", "--mac", mac, "--host", address.host, "--port", str(address.port)]


@pytest.mark.slow
async def test_provision_device_writes_private_credentials(broker: BrokerServer, tmp_path: Path) -> None:
    address = broker.settings.broker
    out = tmp_path / "creds.json"
    result = await asyncio.to_thread(
        run_mqttprov,
        *("provision-device", "--mac", "aa:bb:cc:dd:ee:01", "--host", address.host),
        *("--port", str(address.port), "--out", str(out)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    credentials = json.loads(out.read_text(encoding="utf-8"))
    device = await broker.registry.resolve("aa:bb:cc:dd:ee:01")
    assert credentials["device_id"] == str(device.id)
    assert credentials["mqtt_username"] == credentials["mqtt_client_id"] == device.mqtt_username
    assert credentials["mqtt_password"] not in result.stdout + result.stderr
    assert result.stdout.startswith(f"provisioned aa:bb:cc:dd:ee:01: device {device.id}, ")
    assert result.stdout.rstrip().endswith(f"credentials written to {out}")
    code = await asyncio.to_thread(
        connack_code,
        address.host,
        address.port,
        credentials["mqtt_client_id"],
        username=credentials["mqtt_username"],
        password=credentials["mqtt_password"],
    )
    assert code == 0


async def test_provision_device_tightens_an_existing_out_file(broker: BrokerServer, tmp_path: Path) -> None:
    out = tmp_path / "creds.json"
    out.write_text("old", encoding="utf-8")
    out.chmod(0o644)
    args = provision_args(broker, "aabbccddee02")
    result = await asyncio.to_thread(invoke, *args, "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    written = json.loads(out.read_text(encoding="utf-8"))
    summary = json.loads(result.stdout)
    assert "mqtt_password" not in summary
    assert summary == {k: v for k, v in written.items() if k != "mqtt_password"} | {"out": str(out)}


async def test_provision_device_prints_json_when_stdout_is_not_a_terminal(broker: BrokerServer) -> None:
    result = await asyncio.to_thread(invoke, *provision_args(broker, "aa:bb:cc:dd:ee:03"))
    assert result.exit_code == 0, result.stderr
    credentials = json.loads(result.stdout)
    assert credentials["mqtt_password"]
    assert credentials["mqtt_username"] == (await broker.registry.resolve("aa:bb:cc:dd:ee:03")).mqtt_username


async def test_provision_device_with_a_derived_key(sqlite_url: str, tmp_path: Path) -> None:
    provisioning = ProvisioningSettings(auth="device_key", device_key_secret=MASTER_SECRET)
    settings = broker_settings(sqlite_url).model_copy(update={"provisioning": provisioning})
    config = write_config(tmp_path / "factory.toml", {"provisioning": {"device_key_secret": MASTER_SECRET}})
    key = invoke("keys", "derive", "aa:bb:cc:dd:ee:04", "--config", str(config)).stdout.strip()
    async with BrokerServer(settings) as server:
        args = provision_args(server, "aa:bb:cc:dd:ee:04")
        wrong = await asyncio.to_thread(
            invoke, *args, "--device-key", derive_device_key("x", "aa:bb:cc:dd:ee:04")
        )
        right = await asyncio.to_thread(invoke, *args, "--device-key", key)
    one_error_line(wrong, 1, "error: CONNECT_REFUSED: ")
    assert right.exit_code == 0, right.stderr
    assert json.loads(right.stdout)["mqtt_username"].startswith("device_")


async def test_provision_device_names_the_refusal_and_keeps_no_file(sqlite_url: str, tmp_path: Path) -> None:
    settings = broker_settings(sqlite_url).model_copy(
        update={"provisioning": ProvisioningSettings(mode="allowlist")}
    )
    out, kept = tmp_path / "new.json", tmp_path / "kept.json"
    kept.write_text('{"earlier": "credentials"}', encoding="utf-8")
    async with BrokerServer(settings) as server:
        args = provision_args(server, "aa:bb:cc:dd:ee:05")
        refused = await asyncio.to_thread(invoke, *args, "--out", str(out))
        refused_again = await asyncio.to_thread(invoke, *args, "--out", str(kept))
    assert one_error_line(refused, 1, "error: NOT_ALLOWED: ") == (
        "error: NOT_ALLOWED: this MAC is not on the allowlist"
    )
    assert refused_again.exit_code == 1
    assert not out.exists()
    assert kept.read_text(encoding="utf-8") == '{"earlier": "credentials"}'


def test_provision_device_usage_and_connection_errors(tmp_path: Path) -> None:
    port = str(free_port())
    base = ("provision-device", "--mac", "aa:bb:cc:dd:ee:06", "--host", "127.0.0.1", "--port", port)
    both = invoke(*base, "--secret", "a", "--device-key", "b")
    one_error_line(both, 2, "error: --secret and --device-key exclude each other")
    closed = invoke(*base, "--timeout", "2", "--out", str(tmp_path / "c.json"))
    one_error_line(closed, 1, "error: CONNECTION_FAILED: cannot connect to 127.0.0.1:")
    assert not (tmp_path / "c.json").exists()


def test_provision_device_needs_a_port_when_the_broker_picks_its_own(tmp_path: Path) -> None:
    config = write_config(tmp_path / "mqttprov.toml", {"broker": {"host": "127.0.0.1", "port": 0}})
    args = ("provision-device", "--mac", "aa:bb:cc:dd:ee:08", "--secret", "s", "--config", str(config))
    one_error_line(invoke(*args), 2, "error: broker.port is 0 (a free port, picked when the broker starts)")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux script(1) for a terminal")
def test_provision_device_refuses_to_print_a_password_to_a_terminal(tmp_path: Path) -> None:
    # The refusal happens before any connection: nothing listens on this port.
    argv = [mqttprov_executable(), "provision-device", "--mac", "aa:bb:cc:dd:ee:07"]
    command = shlex.join([*argv, "--host", "127.0.0.1", "--port", str(free_port())])
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout.strip() == (
        "error: refusing to print the password to a terminal: use --out FILE or --show-password"
    )
