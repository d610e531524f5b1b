"""``mqttprov operators``: the people who may log in to the operator console (docs/console.md)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli.common import (
    EXIT_USAGE,
    ConfigOption,
    JsonOption,
    fail,
    open_repository,
    print_json,
    run,
    settings_from,
    stdout,
)

if TYPE_CHECKING:
    from provisioning.registry.operators import OperatorInfo

app = typer.Typer(help="Operators: who may log in to the console in the browser.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The operator's login name.")]


def _operator_json(operator: OperatorInfo) -> dict[str, Any]:
    return operator.model_dump(mode="json")


def _password(from_stdin: bool) -> str:
    """The new password: the first line of stdin, or typed twice at a hidden prompt."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        fail("error: no terminal to ask for the password on: pass it with --password-stdin", EXIT_USAGE)
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@app.command("add")
def add(
    name: NameArg,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an operator; the password is asked for (or read with --password-stdin), never an argument."""
    # Imported here, as every registry import of the CLI: a command loads only what it runs.
    from provisioning.errors import ProvisioningError  # noqa: PLC0415
    from provisioning.passwords import PasswordHasher  # noqa: PLC0415
    from provisioning.registry.operators import (  # noqa: PLC0415
        OperatorStore,
        validate_operator_name,
        validate_operator_password,
    )

    try:
        validate_operator_name(name)
    except ProvisioningError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    password = _password(password_stdin)
    try:
        validate_operator_password(password)
    except ProvisioningError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    settings = settings_from(config)

    async def work() -> OperatorInfo:
        hasher = PasswordHasher(settings.auth.bcrypt_cost, workers=1)
        try:
            hashed = await hasher.hash(password)
        finally:
            hasher.close()
        async with open_repository(settings, OperatorStore) as operators:
            return await operators.add(name, hashed)

    added = run(work)
    if as_json:
        print_json(_operator_json(added))
    else:
        stdout.print(f"added operator {added.name!r}: log in to the console with this name")


@app.command("list")
def list_operators(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List operators and when each last logged in (never a hash)."""
    from rich.table import Table  # noqa: PLC0415

    from provisioning.registry.operators import OperatorStore  # noqa: PLC0415

    settings = settings_from(config)

    async def work() -> list[OperatorInfo]:
        async with open_repository(settings, OperatorStore) as operators:
            return await operators.list_operators()

    found = run(work)
    if as_json:
        print_json({"operators": [_operator_json(o) for o in found]})
        return
    table = Table(title=f"Operators ({len(found)})")
    for column in ("name", "created", "last login"):
        table.add_column(column, no_wrap=column == "name")
    for operator in found:
        last = operator.last_login_at.isoformat(timespec="seconds") if operator.last_login_at else "never"
        table.add_row(operator.name, operator.created_at.isoformat(timespec="seconds"), last)
    stdout.print(table)


@app.command("remove")
def remove(name: NameArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Delete an operator: their console sessions end at once, in every process."""
    from provisioning.registry.operators import OperatorStore  # noqa: PLC0415

    settings = settings_from(config)

    async def work() -> OperatorInfo:
        async with open_repository(settings, OperatorStore) as operators:
            return await operators.remove(name)

    gone = run(work)
    if as_json:
        print_json(_operator_json(gone))
    else:
        stdout.print(f"removed operator {gone.name!r}; their console sessions are ended")
