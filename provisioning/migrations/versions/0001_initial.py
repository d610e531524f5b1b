"""The registry's first schema: devices and device_events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = "'pending', 'approved', 'registered', 'online', 'offline', 'decommissioned'"


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.Column("mqtt_username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=60), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("firmware_version", sa.String(length=64), nullable=True),
        sa.Column("sensor_types", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"status IN ({_STATUSES})", name=op.f("ck_devices_status_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("mac", name=op.f("uq_devices_mac")),
        sa.UniqueConstraint("mqtt_username", name=op.f("uq_devices_mqtt_username")),
    )
    op.create_index("ix_devices_status", "devices", ["status"], unique=False)
    op.create_table(
        "device_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=True),
        sa.Column("mac", sa.String(length=17), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("fold_key", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_events")),
    )
    op.create_index("ix_device_events_device_id_id", "device_events", ["device_id", "id"], unique=False)
    op.create_index("ix_device_events_fold_key", "device_events", ["fold_key"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_device_events_fold_key", table_name="device_events")
    op.drop_index("ix_device_events_device_id_id", table_name="device_events")
    op.drop_table("device_events")
    op.drop_index("ix_devices_status", table_name="devices")
    op.drop_table("devices")
