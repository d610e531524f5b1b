"""Audit events: building them, and folding identical repeats into one counted row."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, select, update
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


async def fold_device_events(
    session: AsyncSession, counts: dict[uuid.UUID, int], kind: str, *, actor: Actor
) -> None:
    """:func:`fold_event` for many devices at once (one event kind, no detail): a few statements
    for the whole batch instead of two per device, so presence after a reconnect storm stays cheap."""
    if not counts:
        return
    keys = {fold_key(device_id, None, kind, actor, None): device_id for device_id in counts}
    if session.get_bind().dialect.name == "postgresql":
        for key in sorted(keys):  # one order for every folder: no deadlock between brokers
            await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))
    found = await session.execute(
        select(DeviceEvent.fold_key, func.max(DeviceEvent.id))
        .where(DeviceEvent.fold_key.in_(list(keys)), DeviceEvent.last_at >= utcnow() - FOLD_WINDOW)
        .group_by(DeviceEvent.fold_key)
    )
    folded: dict[str, int] = {key: event_id for key, event_id in found.all() if key is not None}
    now = utcnow()
    table: Table = DeviceEvent.__table__  # type: ignore[assignment]
    if folded:
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("e_id"))
            .values(count=table.c.count + bindparam("e_count"), last_at=now),
            [{"e_id": event_id, "e_count": counts[keys[key]]} for key, event_id in folded.items()],
        )
    fresh = [key for key in keys if key not in folded]
    if fresh:
        await session.execute(
            insert(table),
            [
                {
                    "device_id": keys[key],
                    "mac": None,
                    "kind": kind,
                    "actor": actor.value,
                    "detail": {},
                    "created_at": now,
                    "last_at": now,
                    "count": counts[keys[key]],
                    "fold_key": key,
                }
                for key in fresh
            ],
        )
