"""``mqttprov accounts``: service accounts for back ends (explicit topic rules).

On a Mosquitto deployment (``[external]`` configured, ``credentials = "mosquitto"``) ``add`` and
``rotate`` also set the password on Mosquitto, exactly as ``mqttprov bridge accounts`` does:
Mosquitto checks the passwords there, and the registry's bcrypt hash is no use to it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli.common import (
    ConfigOption,
    JsonOption,
    fail,
    open_repository,
    print_json,
    run,
    settings_from,
    stdout,
)
from broker.external.mosquitto.layout import check_external_rules
from broker.external.mosquitto.runtime import add_account, rotate_account
from broker.external.worker import broker_address
from config import Settings
from config.loader import ENV_PREFIX, read_toml, resolve_config_path
from provisioning.errors import ProvisioningError
from provisioning.passwords import PasswordHasher, generate_password
from provisioning.registry.accounts import AccountInfo, AccountRegistry, validate_account_name
from provisioning.topics import TopicRule, parse_rule

app = typer.Typer(
    help="Service accounts: back ends that log in with explicit topic rules.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Account name (also its MQTT username).")]


def _accounts(settings: Settings) -> AbstractAsyncContextManager[AccountRegistry]:
    return open_repository(settings, AccountRegistry)


async def _hash(settings: Settings, password: str) -> str:
    hasher = PasswordHasher(settings.auth.bcrypt_cost, workers=1)
    try:
        return await hasher.hash(password)
    finally:
        hasher.close()


def _account_json(account: AccountInfo, password: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"name": account.name}
    if password is not None:
        data["password"] = password
    data["allow"] = [str(rule) for rule in account.allow]
    data["created_at"] = account.created_at.isoformat()
    data["updated_at"] = account.updated_at.isoformat()
    return data


def _print_password(account: AccountInfo, password: str, verb: str) -> None:
    stdout.print(f"{verb} service account {account.name!r}")
    stdout.print(f"password: {password}", markup=False)
    stdout.print("This password is shown once; only its bcrypt hash is stored.", style="dim")


def keeps_logins_on_mosquitto(settings: Settings, config: Path | None) -> bool:
    """True on a Mosquitto deployment: ``[external]`` set (file or environment), credentials there.

    ``external.credentials`` defaults to "mosquitto" everywhere, so the value alone says nothing:
    a deployment of ``mqttprov serve`` configures no ``[external]`` at all.
    """
    if settings.external.credentials != "mosquitto":
        return False
    path = resolve_config_path(config)
    if path is not None and "external" in read_toml(path):
        return True
    prefix = f"{ENV_PREFIX}EXTERNAL__"
    return any(variable.upper().startswith(prefix) for variable in os.environ)


def issue_password(
    settings: Settings,
    action: Callable[[str, str], Awaitable[AccountInfo]],
    verb: str,
    as_json: bool,
) -> None:
    """Generate and hash a password, store it with ``action(password, hash)``, print it once."""
    password = generate_password()

    async def work() -> AccountInfo:
        return await action(password, await _hash(settings, password))

    account = run(work)
    if as_json:
        print_json(_account_json(account, password))
    else:
        _print_password(account, password, verb)


@app.command("add")
def add(
    name: NameArg,
    allow: Annotated[
        list[str],
        typer.Option(
            "--allow",
            "-a",
            help='A rule: "subscribe FILTER" or "publish FILTER" (repeat for several).',
        ),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an account with exactly these rules; prints its generated password once.

    On Mosquitto, on Mosquitto too (rules overlapping provision/ are refused).
    """
    settings = settings_from(config)
    on_mosquitto = keeps_logins_on_mosquitto(settings, config)
    try:
        validate_account_name(name)
        rules: list[TopicRule] = [parse_rule(text) for text in allow]
        if on_mosquitto:
            check_external_rules(rules)
    except (ValueError, ProvisioningError) as exc:
        fail(f"error: {exc}", 2)

    async def in_registry(_password: str, password_hash: str) -> AccountInfo:
        async with _accounts(settings) as accounts:
            return await accounts.add(name, password_hash, rules)

    async def on_both(password: str, password_hash: str) -> AccountInfo:
        address = broker_address(settings, None)
        return await add_account(
            settings, address, name, rules=rules, password=password, password_hash=password_hash
        )

    issue_password(settings, on_both if on_mosquitto else in_registry, "created", as_json)


@app.command("list")
def list_accounts(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List service accounts and their rules (never a password)."""
    settings = settings_from(config)

    async def work() -> list[AccountInfo]:
        async with _accounts(settings) as accounts:
            return await accounts.list_accounts()

    found = run(work)
    if as_json:
        print_json({"accounts": [_account_json(a) for a in found]})
        return
    table = Table(title=f"service accounts ({len(found)})")
    for column in ("name", "allow", "updated"):
        table.add_column(column)
    for account in found:
        rules = "\n".join(str(rule) for rule in account.allow) or "-"
        table.add_row(account.name, rules, account.updated_at.isoformat(timespec="seconds"))
    stdout.print(table)


@app.command("rotate")
def rotate(name: NameArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Issue a new password (on Mosquitto too, there); sessions using the old one are disconnected."""
    settings = settings_from(config)

    async def in_registry(_password: str, password_hash: str) -> AccountInfo:
        async with _accounts(settings) as accounts:
            return await accounts.rotate(name, password_hash)

    async def on_both(password: str, password_hash: str) -> AccountInfo:
        return await rotate_account(settings, broker_address(settings, None), name, password, password_hash)

    on_mosquitto = keeps_logins_on_mosquitto(settings, config)
    issue_password(settings, on_both if on_mosquitto else in_registry, "rotated", as_json)


@app.command("remove")
def remove(name: NameArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Delete an account; its live sessions are disconnected within 2 s."""
    settings = settings_from(config)

    async def work() -> None:
        async with _accounts(settings) as accounts:
            await accounts.remove(name)

    run(work)
    if as_json:
        print_json({"removed": name})
        return
    stdout.print(f"removed service account {name!r}")
    if keeps_logins_on_mosquitto(settings, config):
        stdout.print(
            "Mosquitto: `mqttprov bridge run` deletes its client (when it starts, if not running).",
            style="dim",
        )
