"""Account names with hyphens (as the README's `telemetry-reader`), and the two rules that keep
them safe: no name a suffix could turn into a MAC, no two accounts whose client ids could meet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.embedded import BrokerServer
from provisioning.registry.accounts import (
    AccountError,
    AccountExistsError,
    client_ids_overlap,
    validate_account_name,
)
from tests.auth_support import ACCOUNT_PASSWORD, login_code, make_account, settings
from tests.helpers import run_mqttprov, write_config

ACCEPTED, NOT_AUTHORIZED = 0, 5


@pytest.mark.parametrize("name", ["telemetry-reader", "a-b", "billing.v2-eu", "x_1-2"])
def test_hyphens_are_allowed(name: str) -> None:
    assert validate_account_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["ab", "ab-cd", "AB-CD-EF", "ab-cd-ef-01", "ab-cd-ef-01-23", "ab-cd-ef-01-23-45", "trailing-", "-x", ""],
)
def test_names_a_suffix_could_turn_into_a_mac_or_malformed_are_refused(name: str) -> None:
    with pytest.raises(AccountError):
        validate_account_name(name)


def test_overlapping_client_ids() -> None:
    assert client_ids_overlap("telemetry", "telemetry-reader")
    assert client_ids_overlap("telemetry-reader", "telemetry")
    assert not client_ids_overlap("telemetry", "telemetry2")
    assert not client_ids_overlap("telemetry-reader", "telemetry-writer")


async def test_a_hyphenated_account_logs_in_as_itself_and_name_dash_anything(sqlite_url: str) -> None:
    async with BrokerServer(settings(sqlite_url)) as server:
        await make_account(server.accounts, "telemetry-reader", ["subscribe devices/+/telemetry"])
        port = server.settings.broker.port
        for client_id in ("telemetry-reader", "telemetry-reader-1"):
            code = await asyncio.to_thread(
                login_code, port, client_id, username="telemetry-reader", password=ACCOUNT_PASSWORD
            )
            assert code == ACCEPTED, client_id
        wrong = await asyncio.to_thread(
            login_code, port, "telemetry", username="telemetry-reader", password=ACCOUNT_PASSWORD
        )
        assert wrong == NOT_AUTHORIZED


async def test_accounts_whose_client_ids_could_meet_are_refused_both_ways(sqlite_url: str) -> None:
    async with BrokerServer(settings(sqlite_url)) as server:
        await make_account(server.accounts, "telemetry", ["subscribe devices/+/telemetry"])
        with pytest.raises(AccountExistsError, match="would share client ids"):
            await make_account(server.accounts, "telemetry-reader", ["subscribe devices/+/telemetry"])
        await make_account(server.accounts, "billing-eu", ["subscribe devices/+/telemetry"])
        with pytest.raises(AccountExistsError, match="'billing-eu' would share client ids with 'billing'"):
            await make_account(server.accounts, "billing", ["subscribe devices/+/telemetry"])


@pytest.mark.slow
def test_the_readme_s_accounts_example_runs(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(
        tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}, "auth": {"bcrypt_cost": 4}}
    )
    assert run_mqttprov("db", "upgrade", "--config", str(config), cwd=tmp_path).returncode == 0
    done = run_mqttprov(
        "accounts",
        "add",
        "telemetry-reader",
        "--allow",
        "subscribe devices/+/telemetry",
        "--allow",
        "publish devices/+/commands",
        "--config",
        str(config),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
