"""Fleets written straight into a registry: the fast path around provisioning for set-up.

Hashing one bcrypt password per device at cost 10 would make set-up dominate the bench, so a
fleet shares a few passwords, each hashed once. Every login still costs one full bcrypt check
at the stored cost (the verified cache is keyed by username, not by password).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import bcrypt
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning.registry import Device, DeviceStatus, create_engine, username_for
from provisioning.registry.migrate import upgrade
from provisioning.registry.models import ServiceAccount, utcnow
from tests.bench.load import Login

_CHUNK = 5000
_SHARED_PASSWORDS = 4


@dataclass(frozen=True)
class FleetDevice:
    """A device row and the password it logs in with."""

    id: uuid.UUID
    mac: str
    username: str
    password: str = field(repr=False)
    status: DeviceStatus = DeviceStatus.OFFLINE

    @property
    def login(self) -> Login:
        """Its CONNECT: client id and username are both the MQTT username."""
        return Login(self.username, self.username, self.password)

    @property
    def namespace(self) -> str:
        """The default ACL namespace, ``devices/<id>/``."""
        return f"devices/{self.id}/"


@dataclass(frozen=True)
class Fleet:
    """Devices and the bcrypt hash of each shared password."""

    devices: list[FleetDevice]
    hashes: dict[str, str] = field(repr=False)

    def logins(self) -> list[Login]:
        """One CONNECT per device, in fleet order."""
        return [device.login for device in self.devices]


def mac_for(index: int, *, prefix: int = 0x02) -> str:
    """A locally administered unicast MAC, distinct for each index below 2**32."""
    octets = [prefix, (index >> 32) & 0xFF, (index >> 24) & 0xFF, (index >> 16) & 0xFF, (index >> 8) & 0xFF]
    return ":".join(f"{octet:02x}" for octet in [*octets, index & 0xFF])


def make_fleet(
    count: int,
    *,
    cost: int,
    start: int = 0,
    statuses: Sequence[tuple[DeviceStatus, float]] = ((DeviceStatus.OFFLINE, 1.0),),
) -> Fleet:
    """``count`` devices with MACs from index ``start``, statuses in the given proportions."""
    passwords = [f"bench-password-{n}-{uuid.uuid4().hex[:8]}" for n in range(_SHARED_PASSWORDS)]
    hashes = {p: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=cost)).decode() for p in passwords}
    devices: list[FleetDevice] = []
    bounds = _cumulative(statuses)
    for n in range(count):
        device_id = uuid.uuid4()
        status = next(s for s, upto in bounds if n < upto * count) if bounds else DeviceStatus.OFFLINE
        devices.append(
            FleetDevice(
                device_id, mac_for(start + n), username_for(device_id), passwords[n % len(passwords)], status
            )
        )
    return Fleet(devices, hashes)


def _cumulative(statuses: Sequence[tuple[DeviceStatus, float]]) -> list[tuple[DeviceStatus, float]]:
    total = sum(share for _, share in statuses)
    running, out = 0.0, []
    for status, share in statuses:
        running += share / total
        out.append((status, running))
    out[-1] = (out[-1][0], 1.0 + 1e-9)
    return out


async def prepare(url: str) -> AsyncEngine:
    """An engine on ``url`` with the schema migrated to head."""
    engine = create_engine(url)
    await upgrade(engine)
    return engine


async def write_fleet(engine: AsyncEngine, fleet: Fleet) -> None:
    """Bulk-insert the fleet (executemany of ORM rows, in chunks, one transaction each)."""
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for n, device in enumerate(fleet.devices):
        created = now - timedelta(seconds=len(fleet.devices) - n)
        has_credentials = device.status not in (DeviceStatus.PENDING, DeviceStatus.APPROVED)
        rows.append(
            {
                "id": device.id,
                "mac": device.mac,
                "mqtt_username": device.username,
                "password_hash": fleet.hashes[device.password] if has_credentials else None,
                "status": device.status.value,
                "sensor_types": ["temperature"],
                "firmware_version": "1.0.0",
                "created_at": created,
                "updated_at": created,
                "activated_at": created if has_credentials else None,
                "credentials_issued_at": created if has_credentials else None,
            }
        )
    for begin in range(0, len(rows), _CHUNK):
        async with engine.begin() as conn:
            await conn.execute(insert(Device), rows[begin : begin + _CHUNK])


async def write_accounts(
    engine: AsyncEngine, accounts: Sequence[tuple[str, str, list[dict[str, str]]]]
) -> None:
    """Insert service accounts ``(name, bcrypt hash, rules)``."""
    now = utcnow()
    rows = [
        {"name": name, "password_hash": hashed, "rules": rules, "created_at": now, "updated_at": now}
        for name, hashed, rules in accounts
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(ServiceAccount), rows)


def create_registry(
    url: str, fleet: Fleet, accounts: Sequence[tuple[str, str, list[dict[str, str]]]] = ()
) -> None:
    """A migrated registry at ``url`` holding ``fleet`` and ``accounts``."""

    async def build() -> None:
        engine = await prepare(url)
        try:
            await write_fleet(engine, fleet)
            if accounts:
                await write_accounts(engine, accounts)
        finally:
            await engine.dispose()

    asyncio.run(build())


def create_empty_registry(url: str) -> None:
    """A migrated registry at ``url`` with nothing in it."""

    async def build() -> None:
        await (await prepare(url)).dispose()

    asyncio.run(build())


def create_auth_db(url: str, users: Sequence[tuple[str, str]]) -> None:
    """amqtt's ``auth_db`` schema at ``url`` with users ``(username, bcrypt hash)``."""
    from amqtt.contrib.auth_db.models import Base, UserAuth  # noqa: PLC0415 - only this figure needs it
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

    async def build() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
                empty: dict[str, Any] = {"publish_acl": [], "subscribe_acl": [], "receive_acl": []}
                rows = [{"username": name, "password_hash": hashed} | empty for name, hashed in users]
                await conn.execute(insert(UserAuth.__table__), rows)
        finally:
            await engine.dispose()

    asyncio.run(build())


def hash_password(password: str, cost: int) -> str:
    """A bcrypt hash of ``password`` at ``cost``."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def seconds_per_check(cost: int, repeats: int = 5) -> float:
    """Median wall time of one ``bcrypt.checkpw`` at ``cost`` on this machine, now."""
    password = b"bench-timing-password"
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        bcrypt.checkpw(password, hashed)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def seconds_per_hash(cost: int, repeats: int = 5) -> float:
    """Median wall time of one ``bcrypt.hashpw`` (with a fresh salt) at ``cost``, now."""
    times = []
    for n in range(repeats):
        salt = bcrypt.gensalt(rounds=cost)
        started = time.perf_counter()
        bcrypt.hashpw(f"bench-{n}".encode(), salt)
        times.append(time.perf_counter() - started)
    return statistics.median(times)
