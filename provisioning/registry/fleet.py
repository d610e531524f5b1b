"""The fleet at a glance, for the operator console: devices per status and recent enrolments."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, select

from provisioning.registry.models import DeviceEvent, utcnow
from provisioning.registry.status_counts import kept_counts
from provisioning.registry.transactions import Repository

#: The audit event of an enrolment: credentials issued (first time or again).
ENROLMENT_EVENT = "provisioned"


@dataclass(frozen=True)
class Enrolments:
    """Enrolments per hour, oldest hour first; ``start`` is when the first hour began."""

    start: datetime
    per_hour: list[int]

    @property
    def total(self) -> int:
        """Enrolments over the whole span."""
        return sum(self.per_hour)


class FleetStats(Repository):
    """Counts the console's overview shows; reads only."""

    async def status_counts(self) -> dict[str, int]:
        """Devices per status (kept by triggers: no scan of ``devices``), statuses without any left out."""
        async with self._read() as session:
            return await kept_counts(await session.connection())

    async def enrolments(self, *, hours: int = 24, now: datetime | None = None) -> Enrolments:
        """Enrolments in each of the last ``hours`` hours (the last one is the current, partial hour)."""
        end = (now or utcnow()).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        start = end - timedelta(hours=hours)
        # One pass, one bucket per hour, on every backend (no date functions that differ by dialect).
        buckets = [
            func.coalesce(
                func.sum(
                    case(
                        (
                            (DeviceEvent.created_at >= start + timedelta(hours=h))
                            & (DeviceEvent.created_at < start + timedelta(hours=h + 1)),
                            1,
                        ),
                        else_=0,
                    )
                ),
                0,
            )
            for h in range(hours)
        ]
        query = select(*buckets).where(
            DeviceEvent.kind == ENROLMENT_EVENT, DeviceEvent.created_at >= start, DeviceEvent.created_at < end
        )
        async with self._read() as session:
            row = (await session.execute(query)).one()
        return Enrolments(start=start, per_hour=[int(n) for n in row])
