"""``mqttprov db``: database schema management, and copying the registry to another database.

Alembic is imported by the commands that use it, not here: every command, ``mqttprov serve``
included, loads this module, and Alembic (with Mako and Pygments) would add ~10 MB to the broker.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from broker.cli.common import (
    EXIT_USAGE,
    MASK,
    ConfigOption,
    JsonOption,
    fail,
    masked_url,
    open_registry,
    print_json,
    run,
    settings_from,
    stdout,
)
from config import DatabaseSettings
from provisioning import ProvisioningError
from provisioning.registry import create_engine

app = typer.Typer(
    help="Manage the registry's database: migrate its schema, copy it elsewhere.", no_args_is_help=True
)


@app.command("upgrade")
def upgrade(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Create or migrate the registry's tables to this version's schema (safe to repeat)."""
    from provisioning.registry.migrate import upgrade as run_upgrade  # noqa: PLC0415 - Alembic

    settings = settings_from(config)

    async def work() -> tuple[str | None, str]:
        async with open_registry(settings) as registry:
            return await run_upgrade(registry.engine)

    before, after = run(work)
    if as_json:
        print_json({"before": before, "after": after})
    elif before == after:
        stdout.print(f"database already at revision {after}")
    else:
        stdout.print(f"database upgraded from {before or 'empty'} to revision {after}")


@app.command("copy")
def copy(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="The new, empty database (postgresql+asyncpg://USER@HOST/DB); migrated first.",
            show_default=False,
        ),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Copy the whole registry (devices with their password hashes, events, accounts, change feed)
    from the configured database to an empty one, unchanged: devices keep their credentials.

    Stop `mqttprov serve` first: rows written after the copy starts are not copied.
    """
    from provisioning.registry.copy import (  # noqa: PLC0415 - Alembic
        RegistryCopyError,
        copy_registry,
        same_database,
    )

    settings = settings_from(config)
    source_url = settings.database.url
    destination_url = _usable_url(to)
    secrets = [url.password for url in (_parsed(source_url), _parsed(destination_url)) if url.password]
    if same_database(source_url, destination_url):
        fail(f"error: --to {masked_url(destination_url)} is the configured database itself", EXIT_USAGE)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stdout,
        transient=True,
        disable=as_json or not sys.stdout.isatty(),
    )
    tasks: dict[str, TaskID] = {}

    def advance(table: str, done: int, total: int) -> None:
        if table not in tasks:
            tasks[table] = progress.add_task(table, total=total)
        progress.update(tasks[table], completed=done)

    async def work() -> dict[str, int]:
        source = create_engine(source_url, pool_size=settings.database.pool_size)
        destination = create_engine(destination_url)
        try:
            return await copy_registry(source, destination, progress=advance)
        except ProvisioningError as exc:
            # Driver messages may quote a URL: no password leaves this process.
            raise RegistryCopyError(_scrubbed(str(exc), secrets)) from exc
        finally:
            await destination.dispose()
            await source.dispose()

    with progress:
        tables = run(work)
    if as_json:
        print_json({"tables": tables})
        return
    summary = Table("table", "rows")
    for name, rows in tables.items():
        summary.add_row(name, str(rows))
    stdout.print(summary)
    stdout.print(
        f"copied {sum(tables.values())} rows from {masked_url(source_url)} to {masked_url(destination_url)}; "
        "row counts verified. Next: set database.url to the new database."
    )


def _usable_url(url: str) -> str:
    # Neither message quotes the URL: it may carry a password.
    try:
        DatabaseSettings(url=url)
        make_url(url)
    except (ValidationError, ArgumentError, ValueError):
        fail(
            "error: --to is not a database URL this version can use "
            "(sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER[:PASSWORD]@HOST[:PORT]/DB)",
            EXIT_USAGE,
        )
    return url


def _parsed(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        fail("error: database.url is not a valid database URL", EXIT_USAGE)


def _scrubbed(message: str, secrets: list[str]) -> str:
    for secret in secrets:
        message = message.replace(secret, MASK)
    return message
