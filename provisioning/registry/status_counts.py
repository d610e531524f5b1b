"""Devices per status, kept exact by triggers: ``device_status_counts`` holds signed deltas.

Triggers on ``devices`` (migration 0005) append a row for every change, whoever makes it (this
package, another process, ``db copy``, raw SQL): +1 for an inserted device's status, -1 for a
deleted one's, and both for a status change. Writers only ever insert here, so no transaction
waits for another over a shared counter row; on PostgreSQL two writers flipping statuses in
opposite directions (online to offline, offline to online) would otherwise deadlock. A status's
count is the sum of its rows, read in the reader's own snapshot, so it is exact; :func:`compact`
folds the rows to one per status to keep that sum cheap.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import Table, delete, event, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from provisioning.registry.models import Base, DeviceStatusCount

COUNTS: Table = DeviceStatusCount.__table__  # type: ignore[assignment]

#: A reader that sums more delta rows than this folds them afterwards (see :func:`compact`).
COMPACT_ABOVE = 1000


async def kept_count(session: AsyncSession, status: str | None = None) -> tuple[int, int]:
    """Devices in ``status`` (every device for None), and how many delta rows that summed."""
    query = select(func.coalesce(func.sum(COUNTS.c.n), 0), func.count())
    if status is not None:
        query = query.where(COUNTS.c.status == status)
    total, rows = (await session.execute(query)).one()
    return int(total), int(rows)


async def kept_counts(conn: AsyncConnection) -> dict[str, int]:
    """Devices per status, statuses without devices left out."""
    query = select(COUNTS.c.status, func.sum(COUNTS.c.n)).group_by(COUNTS.c.status)
    return {status: int(n) for status, n in (await conn.execute(query)).all() if n}


async def compact(conn: AsyncConnection) -> int:
    """Replace the delta rows by one row per status, in the caller's write transaction.

    Returns how many rows were folded. On PostgreSQL the rows are taken with ``FOR UPDATE SKIP
    LOCKED``: concurrent compactors (two brokers' presence writers) each fold rows the other
    did not take and never wait for each other, so every row is counted exactly once. Rows of
    transactions not yet committed are invisible here and wait for the next compaction. SQLite
    has one writer at a time.
    """
    mine = select(COUNTS.c.id).with_for_update(skip_locked=True)
    taken = (
        await conn.execute(delete(COUNTS).where(COUNTS.c.id.in_(mine)).returning(COUNTS.c.status, COUNTS.c.n))
    ).all()
    sums: Counter[str] = Counter()
    for status, n in taken:
        sums[status] += n
    rows = [{"status": status, "n": n} for status, n in sorted(sums.items()) if n]
    if rows:
        await conn.execute(insert(COUNTS), rows)
    return len(taken)


# The triggers as migration 0005 makes them, for a schema made by ``Base.metadata.create_all``
# instead (the tests compare both). Migrations keep their own frozen copy.
_SQLITE_TRIGGERS = (
    """CREATE TRIGGER devices_status_count_insert AFTER INSERT ON devices
BEGIN
    INSERT INTO device_status_counts (status, n) VALUES (NEW.status, 1);
END""",
    """CREATE TRIGGER devices_status_count_update AFTER UPDATE OF status ON devices
WHEN OLD.status IS NOT NEW.status
BEGIN
    INSERT INTO device_status_counts (status, n) VALUES (OLD.status, -1), (NEW.status, 1);
END""",
    """CREATE TRIGGER devices_status_count_delete AFTER DELETE ON devices
BEGIN
    INSERT INTO device_status_counts (status, n) VALUES (OLD.status, -1);
END""",
)
# TRUNCATE skips row triggers: it empties the deltas too (TRUNCATE, not DELETE, so that it
# waits for a compactor's uncommitted summed rows instead of missing them).
_POSTGRES_TRIGGERS = (
    """CREATE FUNCTION device_status_count_delta() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO device_status_counts (status, n) VALUES (NEW.status, 1);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO device_status_counts (status, n) VALUES (OLD.status, -1), (NEW.status, 1);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO device_status_counts (status, n) VALUES (OLD.status, -1);
    ELSE
        TRUNCATE device_status_counts;
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER devices_status_count_insert AFTER INSERT ON devices
FOR EACH ROW EXECUTE FUNCTION device_status_count_delta()""",
    """CREATE TRIGGER devices_status_count_update AFTER UPDATE OF status ON devices
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION device_status_count_delta()""",
    """CREATE TRIGGER devices_status_count_delete AFTER DELETE ON devices
FOR EACH ROW EXECUTE FUNCTION device_status_count_delta()""",
    """CREATE TRIGGER devices_status_count_truncate AFTER TRUNCATE ON devices
FOR EACH STATEMENT EXECUTE FUNCTION device_status_count_delta()""",
)


def _create_triggers(_metadata: Any, connection: Connection, **kw: Any) -> None:
    created = {table.name for table in kw.get("tables", ())}
    if not {"devices", COUNTS.name} <= created:
        return
    statements = _POSTGRES_TRIGGERS if connection.dialect.name == "postgresql" else _SQLITE_TRIGGERS
    for statement in statements:
        connection.exec_driver_sql(statement)


event.listen(Base.metadata, "after_create", _create_triggers)
