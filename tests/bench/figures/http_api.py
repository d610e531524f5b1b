"""What the HTTP API figures share: ``mqttprov serve`` hosting the API on port 0, tokens, databases.

The API is reached as its users reach it: ``mqttprov serve`` with ``[api] enabled`` in a process
of its own, asked for port 0 and read back from the line it logs once it accepts requests.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from tests.bench.figures.common import sqlite_url
from tests.bench.procs import BenchCrashError
from tests.bench.served import ServedBroker

_LISTENING = re.compile(rb"api listening on (http://\S+)")
_POLL = 0.05


def with_api(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the API on: loopback, a port the OS picks (never a fixed one)."""
    # write_config writes an int as a TOML integer, and a bool is an int: "true" is read as true.
    return {**settings, "api": {**settings.get("api", {}), "enabled": "true", "port": 0}}


@contextmanager
def served_api(
    port: int, directory: Path, settings: dict[str, Any], timeout: float = 60.0
) -> Iterator[tuple[ServedBroker, str]]:
    """``mqttprov serve`` with the API on ``settings`` (see :func:`with_api`); yields it and the API's URL."""
    with ServedBroker("mqttprov", port, directory, settings=with_api(settings)) as broker:
        yield broker, _api_url(broker, timeout)


def _api_url(broker: ServedBroker, timeout: float) -> str:
    # serve opens the API's port after the broker's and logs the URL with the bound port.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _LISTENING.search(broker.log_file.read_bytes())
        if found is not None:
            return found.group(1).decode()
        time.sleep(_POLL)  # the bench, not a test: a log file has nothing to wait on
    raise BenchCrashError(
        f"mqttprov serve logged no API URL within {timeout:.0f} s (MQTTPROV_API__ENABLED=false in the "
        f"environment turns the API off): {broker.log_summary()}"
    )


class DatabaseUnavailableError(Exception):
    """The PostgreSQL server does not answer: the figure notes it and measures SQLite alone."""


@asynccontextmanager
async def registry_database(name: str, directory: Path, postgres_url: str) -> AsyncIterator[str]:
    """The URL of an empty private database: a SQLite file, or a PostgreSQL database dropped afterwards.

    :class:`DatabaseUnavailableError` before the block runs when PostgreSQL does not answer.
    """
    if name == "SQLite":
        yield sqlite_url(directory / f"http-api-{uuid.uuid4().hex[:8]}.db")
        return
    try:
        import asyncpg  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise DatabaseUnavailableError("asyncpg is not installed (pip install -e '.[postgres]')") from exc
    admin_dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    database = f"mqttprov_bench_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(admin_dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailableError(f"not reachable at {postgres_url}: {exc}") from exc
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    try:
        yield f"{postgres_url.rpartition('/')[0]}/{database}"
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
