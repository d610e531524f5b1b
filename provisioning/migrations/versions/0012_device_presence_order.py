"""An index in presence order, ``(last_seen_at, id)``, for the event stream's presence changes.

Every open ``/api/v1/events/stream`` reads the devices whose presence was written since its last
read, about once a second: without this index each read scans every device. The index costs each
presence write an index update; presence is written in batches, so that is a small share of it.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_devices_last_seen_at_id", "devices", ["last_seen_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_devices_last_seen_at_id", table_name="devices")
