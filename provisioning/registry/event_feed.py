"""Reading what happened to devices: a device's audit events by page, and the fleet's enrolments
and presence changes after a position, for the API's event stream.

Every process writes to the registry, so following it is what lets any process (``mqttprov
api`` beside other brokers included) stream what every broker did:

- enrolments are audit events (``provisioned``, ``reissued``, ``requested``) in ``device_events``,
  never folded, so they are followed by id;
- presence is not an audit event (a reconnect storm must stay a few statements: see
  :mod:`provisioning.registry.presence`); each presence write sets ``devices.last_seen_at``, so
  changes are followed by ``(last_seen_at, id)``. Only the latest state of a device is seen: a
  device that came and went between two reads is read once, as gone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, tuple_

from provisioning.registry.models import Device, DeviceEvent, DeviceStatus
from provisioning.registry.schemas import DeviceEventInfo
from provisioning.registry.transactions import Repository

#: The audit kinds that are enrolments: credentials issued (first or again), or an approval asked.
ENROLMENT_KINDS = ("provisioned", "reissued", "requested")


@dataclass(frozen=True)
class PresenceChange:
    """A device's presence as last written: online or not, and when."""

    device_id: uuid.UUID
    mac: str
    status: DeviceStatus
    at: datetime


class EventFeed(Repository):
    """Audit events by page, and the fleet's enrolments and presence after a position."""

    async def device_events(
        self, device_id: uuid.UUID, *, limit: int, before: int | None = None
    ) -> list[DeviceEventInfo]:
        """A device's audit events, newest first; ``before``: only events with a smaller id
        (the last id of the previous page)."""
        query = select(DeviceEvent).where(DeviceEvent.device_id == device_id)
        if before is not None:
            query = query.where(DeviceEvent.id < before)
        query = query.order_by(DeviceEvent.id.desc()).limit(limit)
        async with self._read() as session:
            return [DeviceEventInfo.from_row(r) for r in (await session.scalars(query)).all()]

    async def last_event_id(self) -> int:
        """The newest audit event's id (0 when there is none)."""
        async with self._read() as session:
            return int(await session.scalar(select(func.coalesce(func.max(DeviceEvent.id), 0))) or 0)

    async def enrolments_after(self, last_id: int, *, limit: int) -> list[DeviceEventInfo]:
        """Enrolment events with an id over ``last_id``, oldest first."""
        query = (
            select(DeviceEvent)
            .where(DeviceEvent.id > last_id, DeviceEvent.kind.in_(ENROLMENT_KINDS))
            .order_by(DeviceEvent.id)
            .limit(limit)
        )
        async with self._read() as session:
            return [DeviceEventInfo.from_row(r) for r in (await session.scalars(query)).all()]

    async def presence_after(
        self, after: tuple[datetime, uuid.UUID], until: datetime, *, limit: int
    ) -> list[PresenceChange]:
        """Devices whose presence was written after ``after`` (a ``(last_seen_at, id)`` position)
        and before ``until``, in that order."""
        query = (
            select(Device.id, Device.mac, Device.status, Device.last_seen_at)
            .where(
                Device.last_seen_at.is_not(None),
                Device.last_seen_at >= after[0],
                Device.last_seen_at < until,
                tuple_(Device.last_seen_at, Device.id) > tuple_(*after),
            )
            .order_by(Device.last_seen_at, Device.id)
            .limit(limit)
        )
        async with self._read() as session:
            rows = (await session.execute(query)).all()
        # last_seen_at IS NOT NULL in every row (the query's condition).
        return [PresenceChange(r.id, r.mac, DeviceStatus(r.status), _utc(r.last_seen_at)) for r in rows]


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything the registry stores is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
