"""One :class:`AsyncEngine` per process, set up for safe sharing of a SQLite file or a PostgreSQL pool.

Every wait on the database has a deadline, so that a database that is gone, or a link that stalls
(a dead host answers nothing), turns into :class:`RegistryUnavailableError` in seconds rather than
a task that hangs for the TCP retransmission timeout (~15 min):

- connect: :data:`CONNECT_TIMEOUT` (PostgreSQL: TCP, TLS and authentication);
- a free connection from the pool: :data:`POOL_TIMEOUT`;
- one statement: :data:`STATEMENT_TIMEOUT` on the server (PostgreSQL ``statement_timeout``: a
  query stuck on a lock) and a little more on the client (asyncpg's ``command_timeout``: a link
  that stalls, where the server's limit cannot help);
- SQLite: a writer waits :data:`SQLITE_BUSY_TIMEOUT_MS` for another process's writer.

docs/operations/database-faults.md tells what each means in an outage.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from provisioning.errors import RegistryUnavailableError

#: Execution option that marks a transaction as a writer (SQLite takes the write lock up front).
WRITE_OPTION = "mqttprov_write"
#: Milliseconds a SQLite writer waits for another process's write lock ("database is locked").
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Seconds to open a PostgreSQL connection, authentication included.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for a free connection when the pool is exhausted (SQLAlchemy's default: 30).
POOL_TIMEOUT = 5.0
#: Seconds one statement may run on the PostgreSQL server (registry statements take milliseconds;
#: ``None`` for a caller that runs long statements, e.g. a migration of a large registry).
STATEMENT_TIMEOUT: float | None = 15.0
#: Seconds the client waits on top of the server's limit before it gives the connection up.
COMMAND_GRACE = 5.0


def create_engine(
    url: str,
    *,
    pool_size: int = 5,
    echo: bool = False,
    statement_timeout: float | None = STATEMENT_TIMEOUT,
) -> AsyncEngine:
    """Create the registry engine for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    ``statement_timeout``: seconds per PostgreSQL statement (None: no limit, for long migrations).
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise RegistryUnavailableError(f"invalid database url: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(
            parsed,
            echo=echo,
            pool_timeout=POOL_TIMEOUT,
            # sqlite3's own busy handler: a writer waits for another process's writer
            # (the broker and the CLI share one file) instead of failing at once.
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT}
    if statement_timeout is not None:
        connect_args["command_timeout"] = statement_timeout + COMMAND_GRACE
        connect_args["server_settings"] = {"statement_timeout": str(int(statement_timeout * 1000))}
    return create_async_engine(
        parsed,
        echo=echo,
        pool_size=pool_size,
        pool_timeout=POOL_TIMEOUT,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (pysqlite's implicit BEGIN is deferred, see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads and then writes cannot wait for the lock
        # (SQLite answers "database is locked" at once); writers take it up front instead.
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
