"""``mqttprov accounts``: create, list, rotate and remove service accounts from the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from typer.testing import CliRunner, Result

from broker.cli import app
from provisioning.registry import create_engine
from provisioning.registry.accounts import AccountCredentials, AccountRegistry
from tests.helpers import preserved_logging, run_mqttprov, write_config


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with preserved_logging():
        yield


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    path = write_config(
        tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}, "auth": {"bcrypt_cost": 4}}
    )
    assert invoke("db", "upgrade", "--config", str(path)).exit_code == 0
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


def stored(url: str, name: str) -> AccountCredentials | None:
    async def read() -> AccountCredentials | None:
        accounts = AccountRegistry(create_engine(url))
        try:
            return await accounts.find(name)
        finally:
            await accounts.close()

    return asyncio.run(read())


@pytest.mark.slow
def test_add_prints_the_password_once_and_stores_only_its_hash(config_file: Path, sqlite_url: str) -> None:
    result = invoke(
        "accounts",
        "add",
        "reader",
        "--allow",
        "subscribe devices/+/telemetry",
        "--allow",
        "publish devices/+/commands",
        "--json",
        "--config",
        str(config_file),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "reader"
    assert data["allow"] == ["subscribe devices/+/telemetry", "publish devices/+/commands"]
    assert len(data["password"]) == 32
    record = stored(sqlite_url, "reader")
    assert record is not None
    assert record.password_hash != data["password"]
    assert bcrypt.checkpw(data["password"].encode(), record.password_hash.encode())

    listed = invoke("accounts", "list", "--json", "--config", str(config_file))
    assert data["password"] not in listed.stdout
    assert json.loads(listed.stdout)["accounts"][0]["allow"] == data["allow"]


@pytest.mark.slow
def test_rotate_changes_the_password(config_file: Path, sqlite_url: str) -> None:
    first = json.loads(
        invoke("accounts", "add", "svc", "-a", "subscribe #", "--json", "-c", str(config_file)).stdout
    )
    rotated = invoke("accounts", "rotate", "svc", "--json", "-c", str(config_file))
    assert rotated.exit_code == 0
    second = json.loads(rotated.stdout)
    record = stored(sqlite_url, "svc")
    assert record is not None
    assert second["password"] != first["password"]
    assert bcrypt.checkpw(second["password"].encode(), record.password_hash.encode())
    assert not bcrypt.checkpw(first["password"].encode(), record.password_hash.encode())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "device_x", "-a", "subscribe #"], 2, "error: invalid account name 'device_x'"),
        (["add", "aabbccddeeff", "-a", "subscribe #"], 2, "error: invalid account name"),
        (
            ["add", "svc", "-a", "read devices/#"],
            2,
            "error: rule must be 'subscribe FILTER' or 'publish FILTER'",
        ),
        (["add", "svc", "-a", "subscribe a/#/b"], 2, "error: '#' must be a whole last level"),
        (["rotate", "ghost"], 1, "error: no service account named 'ghost'"),
        (["remove", "ghost"], 1, "error: no service account named 'ghost'"),
    ],
)
def test_refusals_are_one_line(config_file: Path, args: list[str], code: int, message: str) -> None:
    result = invoke("accounts", *args, "--config", str(config_file))
    assert result.exit_code == code
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_duplicate_and_remove_as_a_real_process(config_file: Path, sqlite_url: str, tmp_path: Path) -> None:
    assert (
        run_mqttprov(
            "accounts", "add", "svc", "-a", "subscribe #", "-c", str(config_file), cwd=tmp_path
        ).returncode
        == 0
    )
    again = run_mqttprov("accounts", "add", "svc", "-a", "subscribe #", "-c", str(config_file), cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr == "error: a service account named 'svc' already exists\n"
    removed = run_mqttprov("accounts", "remove", "svc", "-c", str(config_file), cwd=tmp_path)
    assert removed.returncode == 0
    assert "Traceback" not in removed.stderr
    assert stored(sqlite_url, "svc") is None
