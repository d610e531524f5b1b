"""Copy a whole registry from one database to another, rows unchanged (SQLite to PostgreSQL, say).

Devices keep working only if their rows arrive exactly as they were: the id, the MQTT username,
the bcrypt hash and the status. So every table is copied with its primary keys, in one
destination transaction (a failure leaves the destination empty), and checked by row counts
before that transaction commits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Integer, Table, func, insert, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from provisioning.errors import ProvisioningError, RegistryUnavailableError
from provisioning.registry.engine import WRITE_OPTION
from provisioning.registry.migrate import current_revision, head_revision, upgrade
from provisioning.registry.models import Base, Device
from provisioning.registry.status_counts import COUNTS, compact, kept_counts

logger = logging.getLogger(__name__)

#: Rows read and inserted at a time.
CHUNK_SIZE = 1000
_POSTGRES_PORT = 5432

#: ``progress(table, rows done, rows in the table)``: called before a table's first row and after each chunk.
Progress = Callable[[str, int, int], None]


class RegistryCopyError(ProvisioningError):
    """The registry cannot be copied (the message says why, in one line)."""


class DestinationNotEmptyError(RegistryCopyError):
    """The destination already holds rows: copying would mix two registries."""

    def __init__(self, table: str, rows: int) -> None:
        super().__init__(
            f"destination database is not empty: table {table} has {rows} row(s); "
            "copy only into a new, empty database"
        )
        self.table = table


class SameDatabaseError(RegistryCopyError):
    """Source and destination are the same database."""


class CopyDatabaseError(RegistryCopyError):
    """One side's database failed (unreachable, refused a statement); ``side`` says which."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(f"{side} database {message}")
        self.side = side


#: Tables the destination's triggers fill as devices arrive: copying them would count twice.
DERIVED_TABLES = frozenset({COUNTS.name})


def registry_tables() -> list[Table]:
    """Every table copied, parents before children: all but Alembic's and :data:`DERIVED_TABLES`."""
    return [table for table in Base.metadata.sorted_tables if table.name not in DERIVED_TABLES]


def same_database(first: str | URL, second: str | URL) -> bool:
    """True when both URLs name one database (user, password and driver aside).

    SQLite paths are compared resolved; PostgreSQL by host, port and database name. Unparsable
    URLs are never "the same": creating the engine reports them.
    """
    try:
        a, b = make_url(first), make_url(second)
    except (ArgumentError, ValueError):
        return False
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return _sqlite_path(a) is not None and _sqlite_path(a) == _sqlite_path(b)
    return _server_key(a) == _server_key(b)


def _sqlite_path(url: URL) -> Path | None:
    if not url.database or url.database == ":memory:":
        return None
    return Path(url.database).expanduser().resolve()


def _server_key(url: URL) -> tuple[str, int, str | None]:
    host = (url.host or "localhost").lower()
    return ("localhost" if host == "127.0.0.1" else host, url.port or _POSTGRES_PORT, url.database)


async def copy_registry(
    source: AsyncEngine,
    destination: AsyncEngine,
    *,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict[str, int]:
    """Copy every registry table from ``source`` into the empty ``destination``; rows per table.

    The source must be at this version's schema (``mqttprov db upgrade``); the destination is
    migrated to it first and must hold no rows. Rows written to the source after the copy
    started are not copied: stop the broker first.
    """
    if same_database(source.url, destination.url):
        raise SameDatabaseError("source and destination are the same database")
    _require_sqlite_file(source)
    head = head_revision()
    async with _failures("source"):
        revision = await current_revision(source)
    if revision is None:
        raise RegistryCopyError("source database holds no registry (no migrations applied)")
    if revision != head:
        raise RegistryCopyError(
            f"source database is at revision {revision}, this version's is {head}: "
            "run `mqttprov db upgrade` on it first"
        )
    async with _failures("destination"):
        await upgrade(destination)
    tables = registry_tables()
    async with _failures("source"), _source_snapshot(source) as reader:
        totals = {table.name: await _count(reader, table) for table in tables}
        async with _failures("destination"), _destination_transaction(destination) as writer:
            await _require_empty(writer, tables)
            for table in tables:
                await _copy_table(
                    reader, writer, table, totals[table.name], progress=progress, chunk_size=chunk_size
                )
            if writer.dialect.name == "postgresql":
                for table in tables:
                    await _reset_sequence(writer, table)
            await _verify(writer, tables, totals)
            await _fold_status_counts(writer)
    logger.info(
        "registry copied: %s", ", ".join(f"{name}={rows}" for name, rows in totals.items()) or "no tables"
    )
    return totals


def _require_sqlite_file(engine: AsyncEngine) -> None:
    # Connecting would create the file: a mistyped path must not become an empty "registry".
    path = _sqlite_path(engine.url) if engine.url.get_backend_name() == "sqlite" else None
    if path is not None and not path.is_file():
        raise RegistryCopyError(f"source database file {path} does not exist")


@asynccontextmanager
async def _source_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    # One read transaction: every table is read as of one moment (a SQLite read transaction
    # in WAL mode, REPEATABLE READ on PostgreSQL).
    options: dict[str, Any] = {}
    if engine.dialect.name == "postgresql":
        options["isolation_level"] = "REPEATABLE READ"
    async with engine.connect() as plain:
        conn = await plain.execution_options(**options) if options else plain
        async with conn.begin():
            yield conn


@asynccontextmanager
async def _destination_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as plain:
        # SQLite takes the write lock at BEGIN (see engine._on_begin).
        conn = await plain.execution_options(**{WRITE_OPTION: True})
        async with conn.begin():
            if conn.dialect.name == "postgresql":
                # Nobody else (a broker, a second copy) may write between the emptiness check
                # and the commit; reads may go on.
                names = ", ".join(conn.dialect.identifier_preparer.quote(t.name) for t in registry_tables())
                await conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
            yield conn


async def _count(conn: AsyncConnection, table: Table) -> int:
    return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def _require_empty(conn: AsyncConnection, tables: list[Table]) -> None:
    for table in tables:
        rows = await _count(conn, table)
        if rows:
            raise DestinationNotEmptyError(table.name, rows)


async def _copy_table(
    reader: AsyncConnection,
    writer: AsyncConnection,
    table: Table,
    total: int,
    *,
    progress: Progress | None,
    chunk_size: int,
) -> None:
    if progress is not None:
        progress(table.name, 0, total)
    aware = [column.name for column in table.columns if _is_aware_datetime(column.type)]
    done = 0
    query = select(table).order_by(*table.primary_key.columns)
    async with _failures("source"):
        result = await reader.stream(query.execution_options(yield_per=chunk_size))
    chunks = result.partitions(chunk_size)
    while True:
        async with _failures("source"):
            chunk = await anext(chunks, None)
        if chunk is None:
            return
        rows = [_as_utc(dict(row._mapping), aware) for row in chunk]
        async with _failures("destination"):
            await writer.execute(insert(table), rows)
        done += len(rows)
        if progress is not None:
            progress(table.name, done, total)


def _is_aware_datetime(column_type: Any) -> bool:
    return isinstance(column_type, DateTime) and bool(column_type.timezone)


def _as_utc(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    # SQLite keeps no offset: the registry writes UTC, and reads it back naive. Left naive,
    # asyncpg would take it for the local time of this machine.
    for name in columns:
        value = row[name]
        if isinstance(value, datetime):
            row[name] = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return row


async def _reset_sequence(conn: AsyncConnection, table: Table) -> None:
    # Rows were inserted with their ids, so the sequence did not move: the next insert would
    # take id 1 again. pg_get_serial_sequence is NULL for a table without one (no-op).
    pk = list(table.primary_key.columns)
    if len(pk) != 1 or not isinstance(pk[0].type, Integer):
        return
    column = pk[0]
    top = select(func.max(column)).scalar_subquery()
    await conn.execute(
        select(
            func.setval(
                func.pg_get_serial_sequence(table.name, column.name),
                func.coalesce(top, 1),
                top.is_not(None),
            )
        )
    )


async def _verify(conn: AsyncConnection, tables: list[Table], totals: dict[str, int]) -> None:
    for table in tables:
        copied = await _count(conn, table)
        if copied != totals[table.name]:
            raise RegistryCopyError(
                f"table {table.name}: source has {totals[table.name]} row(s), destination {copied}; "
                "nothing was copied"
            )


async def _fold_status_counts(conn: AsyncConnection) -> None:
    # The triggers wrote one delta per device: one row per status is what a broker leaves.
    await compact(conn)
    devices = Device.__table__
    query = select(devices.c.status, func.count()).group_by(devices.c.status)
    counted = {status: int(n) for status, n in (await conn.execute(query)).all()}
    if await kept_counts(conn) != counted:
        raise RegistryCopyError(
            "destination database keeps wrong device counts per status (are its triggers missing?); "
            "nothing was copied"
        )


@asynccontextmanager
async def _failures(side: str) -> AsyncIterator[None]:
    """Driver and connection failures as one line that says which database failed.

    Never ``str()`` of a statement error: it lists the parameters, and those include hashes.
    """
    try:
        yield
    except RegistryCopyError:
        raise
    except RegistryUnavailableError as exc:  # from the migration helpers, wrapping the driver's error
        raise CopyDatabaseError(side, _described(exc.__cause__ or exc)) from exc
    except (SQLAlchemyError, OSError) as exc:
        raise CopyDatabaseError(side, _described(exc)) from exc


def _described(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        return f"error: {_first_line(str(exc.orig))}"
    if isinstance(exc, OSError):
        return f"unavailable: {_first_line(str(exc))}"
    if isinstance(exc, SQLAlchemyError):
        return f"error: {type(exc).__name__}"
    return f"error: {_first_line(str(exc))}"


def _first_line(message: str) -> str:
    lines: Iterator[str] = (line.strip() for line in message.splitlines())
    return next((line for line in lines if line), "unknown error")
