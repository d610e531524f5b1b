"""An index for the fleet's recent events of one kind (the console's enrolments over the last day).

Without it, counting a day's enrolments scans every audit event the registry ever kept.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_device_events_kind_created_at", "device_events", ["kind", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_device_events_kind_created_at", table_name="device_events")
