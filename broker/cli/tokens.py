"""``mqttprov tokens``: bearer tokens of the HTTP management API, with scopes; secrets shown once."""

from __future__ import annotations

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
    from provisioning.registry.tokens import ApiTokenInfo, IssuedToken, Scope

app = typer.Typer(
    help="API tokens: bearer secrets of the HTTP management API, each with explicit scopes.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The token's name.")]


def _token_json(token: ApiTokenInfo, secret: str | None = None) -> dict[str, Any]:
    data = token.model_dump(mode="json")
    if secret is not None:
        data["secret"] = secret
    return data


def _scopes(values: list[str]) -> frozenset[Scope]:
    """The scopes named on the command line, or exit 2 naming the one that is not."""
    # Imported here, as every registry import of the CLI: a command loads only what it runs.
    from provisioning.registry.tokens import Scope  # noqa: PLC0415

    try:
        return frozenset(Scope(value.strip().lower()) for value in values)
    except ValueError as exc:
        known = ", ".join(s.value for s in Scope)
        fail(f"error: {exc} (scopes: {known})", EXIT_USAGE)


@app.command("create")
def create(
    name: NameArg,
    scope: Annotated[
        list[str],
        typer.Option("--scope", "-s", metavar="SCOPE", help="read, write or provision (repeat for several)."),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a token with exactly these scopes; prints its secret once."""
    from provisioning.errors import ProvisioningError  # noqa: PLC0415
    from provisioning.registry.tokens import TokenStore, validate_token_request  # noqa: PLC0415

    try:
        request = validate_token_request(name, _scopes(scope))
    except ProvisioningError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    settings = settings_from(config)

    async def work() -> IssuedToken:
        async with open_repository(settings, TokenStore) as tokens:
            return await tokens.create(request.name, request.scopes)

    issued = run(work)
    if as_json:
        print_json(_token_json(issued.token, issued.secret))
        return
    scopes = ", ".join(_token_json(issued.token)["scopes"])
    stdout.print(f"created API token {issued.token.name!r} ({scopes})")
    stdout.print(f"secret: {issued.secret}", markup=False)
    stdout.print("This secret is shown once; only its SHA-256 digest is stored.", style="dim")


@app.command("list")
def list_tokens(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List tokens, their scopes and when each was last used (never a secret)."""
    from rich.table import Table  # noqa: PLC0415

    from provisioning.registry.tokens import TokenStore  # noqa: PLC0415

    settings = settings_from(config)

    async def work() -> list[ApiTokenInfo]:
        async with open_repository(settings, TokenStore) as tokens:
            return await tokens.list()

    found = run(work)
    if as_json:
        print_json({"tokens": [_token_json(t) for t in found]})
        return
    table = Table(title=f"API tokens ({len(found)})")
    for column in ("name", "scopes", "created", "last used", "id"):
        table.add_column(column, no_wrap=column in {"name", "id"})
    for token in found:
        last_used = token.last_used_at.isoformat(timespec="seconds") if token.last_used_at else "never"
        table.add_row(
            token.name,
            ", ".join(_token_json(token)["scopes"]),
            token.created_at.isoformat(timespec="seconds"),
            last_used,
            str(token.id),
        )
    stdout.print(table)


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(metavar="NAME_OR_ID", help="The token's name or id.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a token: every process refuses it from its next request on."""
    from provisioning.registry.tokens import TokenStore  # noqa: PLC0415

    settings = settings_from(config)

    async def work() -> ApiTokenInfo:
        async with open_repository(settings, TokenStore) as tokens:
            return await tokens.revoke(name)

    gone = run(work)
    if as_json:
        print_json(_token_json(gone))
    else:
        stdout.print(f"revoked API token {gone.name!r} ({gone.id})")
