"""Presence writes: device status ``online``/``offline`` and ``last_seen_at``, in batches."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, bindparam, or_, update

from provisioning.registry.events import fold_device_events
from provisioning.registry.models import ACTIVE_STATUSES, Actor, Device, DeviceStatus
from provisioning.registry.status_counts import compact
from provisioning.registry.transactions import Repository

_ACTIVE = [s.value for s in ACTIVE_STATUSES]
_DEVICES: Table = Device.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Presence:
    """The latest presence of one device in a batch."""

    online: bool
    at: datetime


class PresenceStore(Repository):
    """One transaction per batch, however many devices came and went."""

    async def record(self, latest: Mapping[uuid.UUID, Presence], logins: Mapping[uuid.UUID, int]) -> None:
        """Apply the batch: statuses (only of active devices) and folded ``login`` events."""
        if not latest and not logins:
            return
        table = _DEVICES
        statement = (
            update(table)
            # Not ``status.in_(...)``: an expanding IN cannot run as executemany.
            .where(table.c.id == bindparam("b_id"), or_(*(table.c.status == s for s in _ACTIVE)))
            .values(status=bindparam("b_status"), last_seen_at=bindparam("b_at"))
        )
        rows = [
            {
                "b_id": device_id,
                "b_status": (DeviceStatus.ONLINE if p.online else DeviceStatus.OFFLINE).value,
                "b_at": p.at,
            }
            for device_id, p in latest.items()
        ]
        async with self._write() as session:
            if rows:
                conn = await session.connection()
                await conn.execute(statement, rows)
                # Fold the status deltas this batch's triggers just wrote (and any before them):
                # the broker is the busiest writer, and pages sum what is left.
                await compact(conn)
            await fold_device_events(session, dict(logins), "login", actor=Actor.DEVICE)

    async def mark_all_offline(self) -> int:
        """At start-up: nobody is online in a broker that just started (returns how many were)."""
        table = _DEVICES
        statement = (
            update(table)
            .where(table.c.status == DeviceStatus.ONLINE.value)
            .values(status=DeviceStatus.OFFLINE.value)
        )
        async with self._write() as session:
            result = await session.execute(statement)
            await compact(await session.connection())
            return int(getattr(result, "rowcount", 0) or 0)
