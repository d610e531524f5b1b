"""``mqttprov bridge``: keep Mosquitto's dynamic security in step with the registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from broker.cli.accounts import issue_password
from broker.cli.common import ConfigOption, JsonOption, fail, print_json, run, settings_from, stdout
from config import Settings
from provisioning.errors import ProvisioningError
from provisioning.registry.accounts import AccountInfo, validate_account_name
from provisioning.topics import parse_rule

if TYPE_CHECKING:
    from broker.external.mosquitto.sync import SyncReport
    from provisioning.external.link import BrokerAddress

# The commands import the external-broker code (paho among it) when they run: a CLI call that
# does not talk to a broker (``mqttprov devices list``) loads none of it.

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
    from broker.core import run_main_until_signalled  # noqa: PLC0415
    from broker.external.mosquitto.runtime import run_bridge  # noqa: PLC0415

    settings = settings_from(config)
    address = _address(settings, broker)
    run(lambda: run_main_until_signalled(lambda stop: run_bridge(settings, address, stop)), log=settings.log)


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
    from broker.external.mosquitto.runtime import sync  # noqa: PLC0415

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
    from broker.external.mosquitto.layout import check_external_rules  # noqa: PLC0415
    from broker.external.mosquitto.runtime import add_account  # noqa: PLC0415

    settings = settings_from(config)
    address = _address(settings, broker)
    try:
        validate_account_name(name)
        rules = [parse_rule(text) for text in allow]
        check_external_rules(rules)
    except (ValueError, ProvisioningError) as exc:
        fail(f"error: {exc}", 2)

    async def create(password: str, password_hash: str) -> AccountInfo:
        return await add_account(
            settings, address, name, rules=rules, password=password, password_hash=password_hash
        )

    issue_password(settings, create, "created", as_json)


@accounts_app.command("rotate")
def accounts_rotate(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    config: ConfigOption = None,
    broker: BrokerOption = None,
    as_json: JsonOption = False,
) -> None:
    """New password on Mosquitto and in the registry (old sessions are disconnected); printed once."""
    from broker.external.mosquitto.runtime import rotate_account  # noqa: PLC0415

    settings = settings_from(config)
    address = _address(settings, broker)

    async def rotate(password: str, password_hash: str) -> AccountInfo:
        return await rotate_account(settings, address, name, password, password_hash)

    issue_password(settings, rotate, "rotated", as_json)


def _address(settings: Settings, broker: str | None) -> BrokerAddress:
    """The broker to talk to, or one line and exit 2 for a bad URL."""
    from broker.external.worker import broker_address  # noqa: PLC0415

    try:
        return broker_address(settings, broker)
    except ProvisioningError as exc:
        fail(f"error: {exc}", 2)
