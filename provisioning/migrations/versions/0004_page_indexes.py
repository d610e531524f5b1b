"""Indexes that serve a page of devices, filtered by status or not, in its sort order.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_devices_status_created", "devices", ["status", "created_at", "id"])
    op.create_index("ix_devices_created", "devices", ["created_at", "id"])
    # The new status index starts with status: the old one only cost writes.
    op.drop_index("ix_devices_status", table_name="devices")


def downgrade() -> None:
    op.create_index("ix_devices_status", "devices", ["status"])
    op.drop_index("ix_devices_created", table_name="devices")
    op.drop_index("ix_devices_status_created", table_name="devices")
