"""What every command shares: loading settings, running a coroutine, turning errors into one line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from broker.errors import ServeError
from broker.logs import configure_logging
from config import ConfigError, LogSettings, Settings, load_settings
from provisioning import ProvisioningError
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.transactions import Repository

T = TypeVar("T")

#: Exit codes: 1 the operation failed, 2 the command line or configuration is wrong.
EXIT_FAILED = 1
EXIT_USAGE = 2

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file; else the first of $MQTTPROV_CONFIG, ./mqttprov.toml and "
        "/etc/mqttprov/mqttprov.toml",
        dir_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]

stdout = Console(highlight=False, soft_wrap=True)


@dataclass
class CliState:
    """Global flags, set by the top-level callback."""

    debug: bool = False


state = CliState()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one line on stderr and exit."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


def settings_from(path: Path | None) -> Settings:
    """Load the configuration or exit with its one-line error."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def run(
    work: Callable[[], Awaitable[T]],
    *,
    log: LogSettings | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> T:
    """Run one command's coroutine; known errors become one line and a non-zero exit.

    ``log``: a long-running command's ``[log]`` settings; a one-shot command (None) logs
    warnings and errors as text. ``loop_factory``: the event loop to run on (``serve`` and
    ``authd``); default asyncio's.
    """
    if log is None:
        configure_logging(debug=state.debug, level=logging.WARNING)
    else:
        configure_logging(debug=state.debug, level=log.level, log_format=log.format)
    try:
        # asyncio.run takes no loop factory before Python 3.12; its Runner does.
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_awaited(work))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except (ProvisioningError, ServeError) as exc:
        fail(f"error: {exc}")
    except KeyboardInterrupt:
        fail("error: interrupted", 130)
    except Exception as exc:
        if state.debug:
            raise
        fail(f"error: internal: {type(exc).__name__}: {exc} (a bug: run with --debug for a traceback)")


async def _awaited(work: Callable[[], Awaitable[T]]) -> T:
    return await work()


R = TypeVar("R", bound=Repository)


@asynccontextmanager
async def open_repository(settings: Settings, kind: type[R]) -> AsyncIterator[R]:
    """A repository (devices, accounts) on the configured database, disposed on exit."""
    repository = kind(create_engine(settings.database.url, pool_size=settings.database.pool_size))
    try:
        yield repository
    finally:
        await repository.close()


def open_registry(settings: Settings) -> AbstractAsyncContextManager[DeviceRegistry]:
    """The device registry on the configured database, disposed on exit."""
    return open_repository(settings, DeviceRegistry)


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


#: What a secret is shown as.
MASK = "***"


def masked_url(url: str) -> str:
    """``url`` without its password (``***`` when it cannot be parsed at all)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return MASK
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)
