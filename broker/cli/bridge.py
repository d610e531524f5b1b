"""``mqttprov bridge``: keep Mosquitto's dynamic security in step with the registry."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

import typer
from rich.table import Table

from broker.cli.accounts import _account_json, _hash, _print_password
from broker.cli.common import ConfigOption, JsonOption, fail, print_json, run, settings_from, stdout
from broker.external import broker_address, until_signalled
from broker.mosquitto.bridge import DynsecBridge
from broker.mosquitto.layout import check_external_rules
from broker.mosquitto.runtime import open_bridge, run_bridge, sync
from broker.mosquitto.sync import SyncReport
from config import Settings
from provisioning.errors import ProvisioningError
from provisioning.external.link import BrokerAddress
from provisioning.passwords import generate_password
from provisioning.registry.accounts import AccountInfo, AccountNotFoundError, validate_account_name
from provisioning.topics import parse_rule

app = typer.Typer(help="Mosquitto dynamic security: follow the registry, reconcile, service accounts.")
accounts_app = typer.Typer(help="Service accounts on Mosquitto (the password is set there too).")
app.add_typer(accounts_app, name="accounts")

BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        help="mqtt://[admin@]host:port or mqtts://... (default: external.broker); the password "
        "comes from external.admin_password.",
    ),
]


@app.command("run")
def run_command(config: ConfigOption = None, broker: BrokerOption = None) -> None:
    """Set Mosquitto's default ACL access and worker role, then revoke clients as credentials die."""
    settings = settings_from(config)
    address = _address(settings, broker)
    run(lambda: until_signalled(lambda stop: run_bridge(settings, address, stop)), log_level=logging.INFO)


@app.command("sync")
def sync_command(
    config: ConfigOption = None,
    broker: BrokerOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; change nothing.")] = False,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0, help="Leave credentials issued this many seconds ago or less alone."),
    ] = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Reconcile after an outage: reset devices Mosquitto lost, disable clients the registry dropped."""
    settings = settings_from(config)
    address = _address(settings, broker)
    report = run(lambda: sync(settings, address, dry_run=dry_run, grace=grace))
    if as_json:
        print_json(report.to_json())
    else:
        _render(report)


def _render(report: SyncReport) -> None:
    verb = "would do" if report.dry_run else "did"
    stdout.print(
        f"checked {report.devices_checked} devices, {report.accounts_checked} accounts, "
        f"{report.clients_checked} Mosquitto clients; {verb} {len(report.steps)} steps"
    )
    if not report.steps:
        return
    table = Table()
    for column in ("action", "username", "reason"):
        table.add_column(column)
    for step in report.steps:
        table.add_row(step.action, step.username, step.reason)
    stdout.print(table)


@accounts_app.command("add")
def accounts_add(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    allow: Annotated[
        list[str], typer.Option("--allow", "-a", help='"subscribe FILTER" or "publish FILTER".')
    ],
    config: ConfigOption = None,
    broker: BrokerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a service account in the registry and on Mosquitto; prints its password once."""
    settings = settings_from(config)
    address = _address(settings, broker)
    try:
        validate_account_name(name)
        rules = [parse_rule(text) for text in allow]
        check_external_rules(rules)
    except (ValueError, ProvisioningError) as exc:
        fail(f"error: {exc}", 2)

    async def create(bridge: DynsecBridge, password: str, password_hash: str) -> AccountInfo:
        account = await bridge.accounts.add(name, password_hash, rules)
        await bridge.account_issued(name, rules, password, password_hash)
        return account

    _with_new_password(settings, address, create, "created", as_json)


@accounts_app.command("rotate")
def accounts_rotate(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    config: ConfigOption = None,
    broker: BrokerOption = None,
    as_json: JsonOption = False,
) -> None:
    """New password on Mosquitto and in the registry (old sessions are disconnected); printed once."""
    settings = settings_from(config)
    address = _address(settings, broker)

    async def rotate(bridge: DynsecBridge, password: str, password_hash: str) -> AccountInfo:
        found = await bridge.accounts.find(name)
        if found is None:
            raise AccountNotFoundError(f"no service account named {name!r}")
        # Mosquitto first: the bridge then sees the registry's change already matched there.
        await bridge.account_issued(name, list(found.account.allow), password, password_hash)
        return await bridge.accounts.rotate(name, password_hash)

    _with_new_password(settings, address, rotate, "rotated", as_json)


def _with_new_password(
    settings: Settings,
    address: BrokerAddress,
    action: Callable[[DynsecBridge, str, str], Awaitable[AccountInfo]],
    verb: str,
    as_json: bool,
) -> None:
    """Generate and hash a password, run ``action`` with the bridge, print the password once."""
    password = generate_password()

    async def work() -> AccountInfo:
        password_hash = await _hash(settings, password)
        async with open_bridge(settings, address) as bridge:
            return await action(bridge, password, password_hash)

    account = run(work)
    if as_json:
        print_json(_account_json(account, password))
    else:
        _print_password(account, password, verb)


def _address(settings: Settings, broker: str | None) -> BrokerAddress:
    """The broker to talk to, or one line and exit 2 for a bad URL."""
    try:
        return broker_address(settings, broker)
    except ProvisioningError as exc:
        fail(f"error: {exc}", 2)
