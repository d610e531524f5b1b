"""Indexes for prefix searches of devices by MAC, id and username (``provisioning.registry.search``).

PostgreSQL compares the prefixes byte-wise with its pattern operators (a linguistic collation need
not sort ``aa:b`` next to ``aa:bc``), which only a ``varchar_pattern_ops`` index serves; SQLite
makes them plain indexes. ``last_seen_at`` got none here (every login and logout writes it, and a
last-seen range is read in creation order anyway); the event stream's presence order got one in
0012.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_devices_mac_prefix", "devices", ["mac"], postgresql_ops={"mac": "varchar_pattern_ops"}
    )
    op.create_index(
        "ix_devices_username_prefix",
        "devices",
        ["mqtt_username"],
        postgresql_ops={"mqtt_username": "varchar_pattern_ops"},
    )


def downgrade() -> None:
    op.drop_index("ix_devices_username_prefix", table_name="devices")
    op.drop_index("ix_devices_mac_prefix", table_name="devices")
