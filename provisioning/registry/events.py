"""Audit events: building them, and folding identical repeats into one counted row."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from provisioning.registry.models import Actor, DeviceEvent, utcnow

#: Identical foldable events within this window share one row.
FOLD_WINDOW = timedelta(hours=1)


def new_event(
    device_id: uuid.UUID | None,
    mac: str | None,
    kind: str,
    actor: Actor,
    detail: dict[str, Any] | None,
    *,
    fold_key: str | None = None,
) -> DeviceEvent:
    """A new event row (never holding a secret)."""
    now = utcnow()
    return DeviceEvent(
        device_id=device_id,
        mac=mac,
        kind=kind,
        actor=actor.value,
        detail=detail or {},
        created_at=now,
        last_at=now,
        count=1,
        fold_key=fold_key,
    )


def fold_key(
    device_id: uuid.UUID | None, mac: str | None, kind: str, actor: Actor, detail: dict[str, Any] | None
) -> str:
    """What identifies "the same event" for folding."""
    material = json.dumps(
        [str(device_id) if device_id else None, mac, kind, actor.value, detail or {}],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


async def fold_event(
    session: AsyncSession,
    device_id: uuid.UUID | None,
    kind: str,
    *,
    actor: Actor,
    mac: str | None = None,
    detail: dict[str, Any] | None = None,
    count: int = 1,
) -> None:
    """Count ``count`` more of an identical recent event, or start its row (caller's transaction)."""
    key = fold_key(device_id, mac, kind, actor, detail)
    if session.get_bind().dialect.name == "postgresql":
        # Serialise folders of one key (SQLite writers are serialised by BEGIN IMMEDIATE).
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))
    folded_id = await session.scalar(
        select(DeviceEvent.id)
        .where(DeviceEvent.fold_key == key, DeviceEvent.last_at >= utcnow() - FOLD_WINDOW)
        .order_by(DeviceEvent.id.desc())
        .limit(1)
    )
    if folded_id is not None:
        await session.execute(
            update(DeviceEvent)
            .where(DeviceEvent.id == folded_id)
            .values(count=DeviceEvent.count + count, last_at=utcnow())
        )
        return
    event = new_event(device_id, mac, kind, actor, detail, fold_key=key)
    event.count = count
    session.add(event)
