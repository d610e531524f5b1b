"""Devices and service accounts with known passwords, and raw MQTT sessions, for the login and ACL tests.

Everything here that talks to the broker blocks: call it through ``asyncio.to_thread`` (the broker
runs on the test's event loop).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar

import bcrypt

from broker.embedded import BrokerServer
from config import Settings
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus
from provisioning.registry.accounts import AccountInfo, AccountRegistry
from provisioning.topics import parse_rule
from tests.helpers import broker_settings, connect_packet

HOST = "127.0.0.1"
PASSWORD = "correct-horse-battery-staple-0001"
ACCOUNT_PASSWORD = "service-account-password-0002"
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"

T = TypeVar("T")


def settings(database_url: str, *, broker: dict[str, Any] | None = None, **auth: Any) -> Settings:
    """A private broker's settings (port 0: any free one, bcrypt cost 4) with these ``[auth]`` keys on top."""
    base = broker_settings(database_url, **(broker or {}))
    return Settings.model_validate(base.model_dump() | {"auth": base.auth.model_dump() | auth})


def hashed(password: str, cost: int = 4) -> str:
    """A bcrypt hash of ``password`` at ``cost`` (4: the cheapest bcrypt allows)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


async def make_device(
    registry: DeviceRegistry,
    mac: str,
    password: str = PASSWORD,
    *,
    password_hash: str | None = None,
    status: DeviceStatus = DeviceStatus.REGISTERED,
) -> DeviceInfo:
    """A device whose password we know (hashed at cost 4 unless a hash is given)."""
    stored = password_hash if password_hash is not None else hashed(password)
    return await registry.create_device(mac, status=status, password_hash=stored)


async def make_account(
    accounts: AccountRegistry, name: str, rules: Sequence[str], password: str = ACCOUNT_PASSWORD
) -> AccountInfo:
    """A service account with these ``--allow`` rules and a known password."""
    return await accounts.add(name, hashed(password), [parse_rule(rule) for rule in rules])


async def stored_hash(server: BrokerServer, device: DeviceInfo) -> str:
    """The device's current password hash."""
    record = await server.registry.find_credentials_by_username(device.mqtt_username)
    assert record is not None
    assert record.password_hash is not None
    return record.password_hash


async def eventually(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 5.0) -> T:
    """Re-read database state until ``done`` holds or ``timeout`` passes; the last value read.

    Only for state written behind (presence batches, audit events): everything else is awaited.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await read()
        if done(value) or loop.time() >= deadline:
            return value
        await asyncio.sleep(0.05)  # the polling interval against the deadline above


def polled(read: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """``read`` (plain, in-memory state) as the coroutine function :func:`eventually` wants."""

    async def current() -> T:
        return read()

    return current


class RawSession:
    """One MQTT connection on a plain socket: CONNECT, PINGREQ, and an abrupt end."""

    def __init__(self, port: int, *, source: str | None = None, timeout: float = 10.0) -> None:
        source_address = (source, 0) if source is not None else None
        self.sock = socket.create_connection((HOST, port), timeout=timeout, source_address=source_address)

    def connect(self, client_id: str, **kwargs: Any) -> int:
        """Send CONNECT (keywords of :func:`tests.helpers.connect_packet`); the CONNACK code."""
        self.sock.sendall(connect_packet(client_id, **kwargs))
        header = self._receive(4)
        assert header[:2] == b"\x20\x02", f"not a CONNACK: {header!r}"
        return header[3]

    def ping(self) -> None:
        """One PINGREQ, and its PINGRESP (fails on anything else)."""
        self.sock.sendall(PINGREQ)
        answer = self._receive(2)
        assert answer == PINGRESP, f"not a PINGRESP: {answer!r}"

    def closed_by_server(self, within: float) -> bool:
        """True when the broker closes the connection within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        """Close the socket without DISCONNECT: to the broker, a lost link (the will is published)."""
        self.sock.close()

    def _receive(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def login_code(
    port: int, client_id: str, *, source: str | None = None, timeout: float = 10.0, **kwargs: Any
) -> int:
    """CONNECT once on a fresh socket (optionally from ``source``) and return the CONNACK code."""
    with RawSession(port, source=source, timeout=timeout) as session:
        return session.connect(client_id, **kwargs)
