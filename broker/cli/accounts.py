"""``mqttprov accounts``: service accounts for back ends (explicit topic rules)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
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
from config import Settings
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
    """Create an account with exactly these rules; prints its generated password once."""
    settings = settings_from(config)
    try:
        validate_account_name(name)
        rules: list[TopicRule] = [parse_rule(text) for text in allow]
    except (ValueError, ProvisioningError) as exc:
        fail(f"error: {exc}", 2)
    password = generate_password()

    async def work() -> AccountInfo:
        password_hash = await _hash(settings, password)
        async with _accounts(settings) as accounts:
            return await accounts.add(name, password_hash, rules)

    account = run(work)
    if as_json:
        print_json(_account_json(account, password))
    else:
        _print_password(account, password, "created")


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
    """Issue a new password; sessions using the old one are disconnected within 2 s."""
    settings = settings_from(config)
    password = generate_password()

    async def work() -> AccountInfo:
        password_hash = await _hash(settings, password)
        async with _accounts(settings) as accounts:
            return await accounts.rotate(name, password_hash)

    account = run(work)
    if as_json:
        print_json(_account_json(account, password))
    else:
        _print_password(account, password, "rotated")


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
    else:
        stdout.print(f"removed service account {name!r}")
