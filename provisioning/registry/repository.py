"""The device registry: the one place that reads and writes ``devices`` and ``device_events``.

The CLI, the provisioning handler and the auth plugin all go through :class:`DeviceRegistry`;
nothing else issues SQL.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from provisioning.contract import DEVICE_USERNAME_PREFIX
from provisioning.errors import (
    ConcurrentChangeError,
    DeviceExistsError,
    DeviceNotFoundError,
    InvalidTransitionError,
)
from provisioning.mac import parse_device_mac, parse_mac
from provisioning.registry.events import fold_event, new_event
from provisioning.registry.labels import change_labels, check_labels, labels_for
from provisioning.registry.models import Actor, CredentialVerifier, Device, DeviceEvent, DeviceStatus, utcnow
from provisioning.registry.schemas import DeviceCredentials, DeviceEventInfo, DeviceInfo, DevicePage
from provisioning.registry.search import MAX_PAGE, DeviceFilter, DeviceSearch

__all__ = ["MAX_PAGE", "DeviceRegistry", "username_for"]
from provisioning.registry.transactions import record_change

logger = logging.getLogger(__name__)


def username_for(device_id: uuid.UUID) -> str:
    """The MQTT username of a device: ``device_`` and the first 12 hex digits of its id."""
    return f"{DEVICE_USERNAME_PREFIX}{device_id.hex[:12]}"


class DeviceRegistry(DeviceSearch):
    """Repository and service layer over ``devices`` and ``device_events``; pages and exports are
    :class:`DeviceSearch`'s."""

    # -- reads --------------------------------------------------------------------------------

    async def get(self, device_id: uuid.UUID) -> DeviceInfo:
        """The device with this id, or :class:`DeviceNotFoundError`."""
        async with self._read() as session:
            row = await session.get(Device, device_id)
            if row is None:
                raise DeviceNotFoundError(f"no device with id {device_id}")
            return DeviceInfo.from_row(row, await labels_for(session, row.id))

    async def find_by_mac(self, mac: str) -> DeviceInfo | None:
        """The device with this MAC (any accepted notation), or None."""
        canonical = parse_mac(mac)
        async with self._read() as session:
            row = await session.scalar(select(Device).where(Device.mac == canonical))
            return DeviceInfo.from_row(row, await labels_for(session, row.id)) if row is not None else None

    async def find_by_username(self, username: str) -> DeviceInfo | None:
        """The device with this MQTT username, or None."""
        async with self._read() as session:
            row = await session.scalar(select(Device).where(Device.mqtt_username == username))
            return DeviceInfo.from_row(row, await labels_for(session, row.id)) if row is not None else None

    async def resolve(self, id_or_mac: str) -> DeviceInfo:
        """Find a device by id, MAC (any notation) or MQTT username, as operators type them."""
        text = id_or_mac.strip()
        try:
            device_id = uuid.UUID(text)
        except ValueError:
            device_id = None
        if device_id is not None:
            return await self.get(device_id)
        if text.startswith(DEVICE_USERNAME_PREFIX):
            found = await self.find_by_username(text)
        else:
            found = await self.find_by_mac(text)
        if found is None:
            raise DeviceNotFoundError(f"no device matches {text!r}")
        return found

    async def list_devices(
        self, *, status: DeviceStatus | None = None, limit: int = 50, offset: int = 0
    ) -> DevicePage:
        """One page of devices, oldest first, optionally filtered by status (see :meth:`search_devices`)."""
        statuses = frozenset() if status is None else frozenset({status})
        return await self.search_devices(DeviceFilter(status=statuses), limit=limit, offset=offset)

    async def events(self, device_id: uuid.UUID, *, limit: int = 20) -> list[DeviceEventInfo]:
        """The device's most recent audit events, newest first."""
        query = (
            select(DeviceEvent)
            .where(DeviceEvent.device_id == device_id)
            .order_by(DeviceEvent.id.desc())
            .limit(limit)
        )
        async with self._read() as session:
            return [DeviceEventInfo.from_row(r) for r in (await session.scalars(query)).all()]

    # -- writes -------------------------------------------------------------------------------

    async def create_device(
        self,
        mac: str,
        *,
        status: DeviceStatus = DeviceStatus.PENDING,
        firmware_version: str | None = None,
        sensor_types: Iterable[str] = (),
        password_hash: str | None = None,
        actor: Actor = Actor.SYSTEM,
        event_kind: str = "created",
        detail: dict[str, Any] | None = None,
        note: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> DeviceInfo:
        """Insert a device with its ``labels``; :class:`DeviceExistsError` when its MAC is registered.

        Uniqueness is the database's: concurrent creators of one MAC get one row. Group and
        all-zero addresses are :class:`InvalidMacError` (see :func:`parse_device_mac`).
        """
        canonical = parse_device_mac(mac)
        labels = check_labels(labels or {})
        device_id = uuid.uuid4()
        row = Device(
            id=device_id,
            mac=canonical,
            mqtt_username=username_for(device_id),
            password_hash=password_hash,
            credentials_issued_at=utcnow() if password_hash is not None else None,
            note=note,
            status=status.value,
            firmware_version=firmware_version,
            sensor_types=list(sensor_types),
        )
        try:
            async with self._write() as session:
                session.add(row)
                await session.flush()
                session.add(new_event(device_id, canonical, event_kind, actor, detail))
                if labels:
                    await change_labels(session, device_id, labels, ())
        except IntegrityError as exc:
            raise DeviceExistsError(f"a device with MAC {canonical} already exists") from exc
        logger.info("device created id=%s mac=%s status=%s", device_id, canonical, status.value)
        return DeviceInfo.from_row(row, labels)

    async def find_credentials_by_mac(self, mac: str) -> DeviceCredentials | None:
        """The device with this MAC and its password hash (for the provisioning service)."""
        canonical = parse_mac(mac)
        async with self._read() as session:
            row = await session.scalar(select(Device).where(Device.mac == canonical))
            return DeviceCredentials.from_row(row) if row is not None else None

    async def find_credentials_by_username(self, username: str) -> DeviceCredentials | None:
        """The device with this MQTT username, its password hash and its verifier (for the auth service)."""
        query = (
            select(Device, CredentialVerifier)
            .outerjoin(CredentialVerifier, CredentialVerifier.username == Device.mqtt_username)
            .where(Device.mqtt_username == username)
        )
        async with self._read() as session:
            found = (await session.execute(query)).first()
            return DeviceCredentials.from_row(found[0], found[1]) if found is not None else None

    async def add_allowed(
        self,
        mac: str,
        *,
        firmware_version: str | None = None,
        note: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> DeviceInfo:
        """Pre-register a MAC that may enrol (allowlist mode): status ``approved``."""
        return await self.create_device(
            mac,
            status=DeviceStatus.APPROVED,
            firmware_version=firmware_version,
            note=note,
            labels=labels,
            actor=Actor.OPERATOR,
            event_kind="added",
        )

    async def approve(self, device_id: uuid.UUID) -> DeviceInfo:
        """Let a pending (or rejected) device enrol on its next request."""
        return await self._transition(
            device_id, DeviceStatus.APPROVED, {DeviceStatus.PENDING, DeviceStatus.REJECTED}, "approved"
        )

    async def reject(self, device_id: uuid.UUID) -> DeviceInfo:
        """Refuse a pending (or approved, not yet enrolled) device: its requests get NOT_ALLOWED."""
        return await self._transition(
            device_id, DeviceStatus.REJECTED, {DeviceStatus.PENDING, DeviceStatus.APPROVED}, "rejected"
        )

    async def reset(self, device_id: uuid.UUID) -> DeviceInfo:
        """Kill the device's credentials and allow exactly one new enrolment (status ``registered``)."""
        allowed = set(DeviceStatus) - {DeviceStatus.DECOMMISSIONED}
        return await self._transition(
            device_id, DeviceStatus.REGISTERED, allowed, "reset", clear_credentials=True
        )

    async def _transition(
        self,
        device_id: uuid.UUID,
        to: DeviceStatus,
        allowed_from: set[DeviceStatus],
        kind: str,
        *,
        clear_credentials: bool = False,
    ) -> DeviceInfo:
        async with self._write() as session:
            row = await _locked(session, device_id)
            if row.status not in {s.value for s in allowed_from}:
                raise InvalidTransitionError(f"device {row.id} is {row.status}; it cannot be {kind}")
            row.status = to.value
            if clear_credentials:
                row.password_hash = None
                row.credentials_issued_at = None
                row.activated_at = None
                await record_change(session, row.mqtt_username, kind)
            session.add(new_event(row.id, row.mac, kind, Actor.OPERATOR, {"status": to.value}))
            info = DeviceInfo.from_row(row, await labels_for(session, row.id))
        logger.info("device %s id=%s mac=%s", kind, info.id, info.mac)
        return info

    async def issue_credentials(
        self,
        device_id: uuid.UUID,
        password_hash: str,
        *,
        expected_hash: str | None,
        allowed_from: set[DeviceStatus],
        firmware_version: str | None = None,
        sensor_types: Iterable[str] | None = None,
        kind: str = "provisioned",
    ) -> DeviceInfo:
        """Store new credentials, if nobody changed them since ``expected_hash`` was read.

        The compare-and-set makes concurrent issuers (other sessions, other brokers) agree on
        one winner; the others get :class:`ConcurrentChangeError` and must not reply ``ok``.
        """
        same_hash = (
            Device.password_hash.is_(None) if expected_hash is None else Device.password_hash == expected_hash
        )
        values: dict[str, Any] = {
            "password_hash": password_hash,
            "status": DeviceStatus.REGISTERED.value,
            "credentials_issued_at": utcnow(),
            "updated_at": utcnow(),
        }
        if firmware_version is not None:
            values["firmware_version"] = firmware_version
        if sensor_types is not None:
            values["sensor_types"] = list(sensor_types)
        statement = (
            update(Device)
            .where(Device.id == device_id, same_hash, Device.status.in_([s.value for s in allowed_from]))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        async with self._write() as session:
            result = await session.execute(statement)
            if getattr(result, "rowcount", 0) != 1:
                raise ConcurrentChangeError(f"device {device_id} changed while credentials were issued")
            row = await session.get(Device, device_id, populate_existing=True)
            if row is None:  # pragma: no cover - the update above just matched it
                raise DeviceNotFoundError(f"no device with id {device_id}")
            detail = {"firmware_version": row.firmware_version}
            session.add(new_event(row.id, row.mac, kind, Actor.DEVICE, detail))
            await record_change(session, row.mqtt_username, kind)
            return DeviceInfo.from_row(row)

    async def mark_activated(self, device_id: uuid.UUID) -> None:
        """Record the device's first successful login (no-op afterwards)."""
        statement = (
            update(Device)
            .where(Device.id == device_id, Device.activated_at.is_(None))
            .values(activated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        async with self._write() as session:
            await session.execute(statement)

    async def decommission(self, device_id: uuid.UUID, *, actor: Actor = Actor.OPERATOR) -> DeviceInfo:
        """Mark a device decommissioned and destroy its credentials (idempotent)."""
        async with self._write() as session:
            row = await _locked(session, device_id)
            if row.status != DeviceStatus.DECOMMISSIONED:
                row.status = DeviceStatus.DECOMMISSIONED.value
                row.password_hash = None
                session.add(new_event(row.id, row.mac, "decommissioned", actor, None))
                await record_change(session, row.mqtt_username, "decommissioned")
                await session.flush()  # runs onupdate: the view must show the new updated_at
            info = DeviceInfo.from_row(row, await labels_for(session, row.id))
        logger.info("device decommissioned id=%s mac=%s", info.id, info.mac)
        return info

    async def delete(self, device_id: uuid.UUID, *, actor: Actor = Actor.OPERATOR) -> DeviceInfo:
        """Remove a device row; its audit trail stays, closed by a ``deleted`` event."""
        async with self._write() as session:
            row = await _locked(session, device_id)
            info = DeviceInfo.from_row(row, await labels_for(session, row.id))
            # Its labels go with it (ON DELETE CASCADE).
            await session.execute(delete(Device).where(Device.id == device_id))
            await record_change(session, info.mqtt_username, "deleted")
            session.add(new_event(info.id, info.mac, "deleted", actor, {"status": info.status.value}))
        logger.info("device deleted id=%s mac=%s", info.id, info.mac)
        return info

    async def set_labels(
        self, device_id: uuid.UUID, labels: Mapping[str, str], *, remove: Iterable[str] = ()
    ) -> DeviceInfo:
        """Set ``labels`` (a key it names gets the new value) and delete the keys ``remove``."""
        removed = sorted(set(remove))
        async with self._write() as session:
            row = await _locked(session, device_id)
            current = await change_labels(session, row.id, labels, removed)
            row.updated_at = utcnow()
            detail = {"set": dict(labels), "removed": removed}
            session.add(new_event(row.id, row.mac, "labelled", Actor.OPERATOR, detail))
            info = DeviceInfo.from_row(row, current)
        logger.info(
            "device labelled id=%s mac=%s set=%d removed=%d", info.id, info.mac, len(labels), len(removed)
        )
        return info

    async def set_status(
        self,
        device_id: uuid.UUID,
        status: DeviceStatus,
        *,
        allowed_from: Iterable[DeviceStatus] | None = None,
    ) -> DeviceInfo:
        """Change a device's status, refusing when it is not in ``allowed_from``."""
        async with self._write() as session:
            row = await _locked(session, device_id)
            if allowed_from is not None and row.status not in {s.value for s in allowed_from}:
                raise InvalidTransitionError(
                    f"device {row.id} is {row.status}; cannot change it to {status.value}"
                )
            row.status = status.value
            await session.flush()  # runs onupdate: the view must show the new updated_at
            return DeviceInfo.from_row(row)

    async def record_event(
        self,
        device_id: uuid.UUID | None,
        kind: str,
        *,
        actor: Actor,
        detail: dict[str, Any] | None = None,
        mac: str | None = None,
        fold: bool = False,
    ) -> None:
        """Append an audit event; with ``fold`` an identical recent event is counted instead."""
        async with self._write() as session:
            if fold:
                await fold_event(session, device_id, kind, actor=actor, mac=mac, detail=detail)
            else:
                session.add(new_event(device_id, mac, kind, actor, detail))


async def _locked(session: AsyncSession, device_id: uuid.UUID) -> Device:
    row = await session.scalar(select(Device).where(Device.id == device_id).with_for_update())
    if row is None:
        raise DeviceNotFoundError(f"no device with id {device_id}")
    return row
