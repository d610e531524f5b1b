"""Enrolment: the rejected status, an operator note, and when credentials were issued.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "'pending', 'approved', 'registered', 'online', 'offline', 'decommissioned'"
_NEW = "'pending', 'approved', 'rejected', 'registered', 'online', 'offline', 'decommissioned'"


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("credentials_issued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("note", sa.String(length=256), nullable=True))
        batch.drop_constraint(op.f("ck_devices_status_valid"), type_="check")
        batch.create_check_constraint("status_valid", f"status IN ({_NEW})")


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint(op.f("ck_devices_status_valid"), type_="check")
        batch.create_check_constraint("status_valid", f"status IN ({_OLD})")
        batch.drop_column("note")
        batch.drop_column("credentials_issued_at")
