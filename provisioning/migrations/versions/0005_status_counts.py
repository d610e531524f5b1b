"""Devices per status kept by triggers: ``device_status_counts`` (signed deltas), seeded from ``devices``.

A page of devices filtered by status reports an exact total; counting 60,000 rows for it was
most of the page's time at 100k devices. See ``provisioning/registry/status_counts.py``.

On SQLite, a later migration that rebuilds ``devices`` in batch mode (copy, drop, rename) drops
these triggers with the old table: it must create them again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TRIGGERS = ("insert", "update", "delete")

_SQLITE = (
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
_POSTGRES = (
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


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_table(
        "device_status_counts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_status_counts")),
    )
    op.create_index("ix_device_status_counts_status", "device_status_counts", ["status"])
    # Triggers first: on PostgreSQL creating them locks out writers of devices until this
    # transaction commits, so the seed below counts a table nobody is changing.
    for statement in _POSTGRES if _postgres() else _SQLITE:
        op.execute(statement)
    op.execute(
        "INSERT INTO device_status_counts (status, n) SELECT status, count(*) FROM devices GROUP BY status"
    )


def downgrade() -> None:
    if _postgres():
        for name in (*_TRIGGERS, "truncate"):
            op.execute(f"DROP TRIGGER devices_status_count_{name} ON devices")
        op.execute("DROP FUNCTION device_status_count_delta()")
    else:
        for name in _TRIGGERS:
            op.execute(f"DROP TRIGGER devices_status_count_{name}")
    op.drop_index("ix_device_status_counts_status", table_name="device_status_counts")
    op.drop_table("device_status_counts")
