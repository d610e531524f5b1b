"""What ``device_status_counts`` says against what ``devices`` holds, on any test database."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning.registry import create_engine
from provisioning.registry.models import Device
from provisioning.registry.status_counts import COUNTS, kept_counts


@dataclass(frozen=True)
class StatusCounts:
    """Devices per status as kept by the triggers and as counted, and the delta rows kept."""

    kept: dict[str, int]
    counted: dict[str, int]
    rows: int


async def status_counts(engine: AsyncEngine) -> StatusCounts:
    """Both views of the counts, read in one transaction."""
    query = select(Device.status, func.count()).group_by(Device.status)
    async with engine.connect() as conn, conn.begin():
        counted = {status: int(n) for status, n in (await conn.execute(query)).all()}
        kept = await kept_counts(conn)
        rows = int(await conn.scalar(select(func.count()).select_from(COUNTS)) or 0)
    return StatusCounts(kept, counted, rows)


async def status_counts_at(url: str) -> StatusCounts:
    """:func:`status_counts` on a database given by its URL."""
    engine = create_engine(url)
    try:
        return await status_counts(engine)
    finally:
        await engine.dispose()
