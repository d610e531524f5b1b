"""Malformed MQTT, odd logins and resource limits against the embedded broker, on raw sockets.

Every case is sent a few times on fresh connections. Each time the connection must end the way
MQTT 3.1.1 says (closed, or a given CONNACK code and closed), and afterwards the broker must hold
no more sessions, asyncio tasks or file descriptors than after the first time (leaks grow with
repetition; the first attempt warms up pools and caches), and a device connected all along must
still get its own messages back.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from broker import BrokerServer
from broker.protocol import KeepAliveHandler
from config import Settings
from provisioning.registry import DeviceInfo
from tests.auth_support import (
    ACCOUNT_PASSWORD,
    PASSWORD,
    RawSession,
    eventually,
    make_account,
    settings,
)
from tests.bench.mqtt import remaining_length
from tests.mqtt_clients import Client

T = TypeVar("T")
REPEATS = 3
CONTROL_MAC = "02:00:00:00:aa:01"
VICTIM_MAC = "02:00:00:00:aa:02"
#: How long the server may take to close a connection it should close (slowloris cases take 1 s).
CLOSE_WITHIN = 8.0
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


def connack(code: int) -> bytes:
    """The CONNACK bytes for a return code (session present 0)."""
    return bytes([0x20, 0x02, 0x00, code])


# -- raw packet building --------------------------------------------------------------------------


def frame(first: int, body: bytes) -> bytes:
    """One packet: first header byte, remaining length, body."""
    return bytes([first]) + remaining_length(len(body)) + body


def field(raw: bytes) -> bytes:
    """A length-prefixed string or binary field (any bytes, valid or not)."""
    return struct.pack("!H", len(raw)) + raw


def connect_raw(
    client_id: bytes,
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    flags: int = 0x02,
    extra: bytes = b"",
) -> bytes:
    """A CONNECT built from raw fields (``extra``: what follows the client id)."""
    body = field(name) + bytes([level, flags]) + struct.pack("!H", 30) + field(client_id) + extra
    return frame(0x10, body)


def publish(topic: bytes, payload: bytes = b"x", *, qos: int = 0, packet_id: int = 1) -> bytes:
    """A PUBLISH with a raw topic."""
    ident = struct.pack("!H", packet_id) if qos else b""
    return frame(0x30 | (qos << 1), field(topic) + ident + payload)


def subscribe(*filters: tuple[bytes, int], first: int = 0x82, packet_id: int = 1) -> bytes:
    """A SUBSCRIBE with raw filters and requested-QoS bytes."""
    body = struct.pack("!H", packet_id) + b"".join(field(f) + bytes([q]) for f, q in filters)
    return frame(first, body)


def unsubscribe(*filters: bytes) -> bytes:
    """An UNSUBSCRIBE with raw filters."""
    return frame(0xA2, struct.pack("!H", 1) + b"".join(field(f) for f in filters))


# -- the broker, its control device, and the leak check --------------------------------------------


@dataclass
class Snapshot:
    """What a connection could leave behind."""

    fds: int
    tasks: int
    sessions: frozenset[str]


@dataclass
class Harness:
    """A broker with a device connected throughout (the "other client" that must keep working)."""

    server: BrokerServer
    control: Client
    control_device: DeviceInfo
    victim: DeviceInfo

    @property
    def port(self) -> int:
        return self.server.settings.broker.port

    def snapshot(self) -> Snapshot:
        return Snapshot(
            fds=sum(1 for _ in Path("/proc/self/fd").iterdir()),
            tasks=len(asyncio.all_tasks()),
            sessions=frozenset(self.server.broker.sessions),
        )

    async def assert_nothing_left(self, baseline: Snapshot) -> None:
        """Sessions, tasks and descriptors back to ``baseline``; the control device still served."""

        async def now() -> Snapshot:
            return self.snapshot()

        # Connections are torn down after the socket closes (and clean sessions leave amqtt's
        # table up to 1 s later): re-read against a deadline.
        after = await eventually(
            now,
            lambda s: s.fds <= baseline.fds and s.tasks <= baseline.tasks and s.sessions <= baseline.sessions,
        )
        assert after.sessions <= baseline.sessions, after.sessions - baseline.sessions
        assert after.fds <= baseline.fds, (after.fds, baseline.fds)
        assert after.tasks <= baseline.tasks, [t.get_coro() for t in asyncio.all_tasks()]
        topic = f"devices/{self.control_device.id}/ping"
        assert await asyncio.to_thread(self.control.roundtrip, topic, os.urandom(8).hex().encode())


def hostile_settings(sqlite_url: str, **broker: object) -> Settings:
    """Short CONNECT and packet timeouts; failed logins not throttled (throttling has its own tests)."""
    return settings(
        sqlite_url,
        broker={"connect_timeout": 1.0, "max_packet_bytes": 4096} | broker,
        throttle_after=10_000,
        lockout_after=10_000,
    )


@asynccontextmanager
async def running(config: Settings) -> AsyncIterator[Harness]:
    """A broker on ``config`` with the control device connected and subscribed to its namespace."""
    async with running(config) as running_harness:
        yield running_harness


def connect_from(source: str, port: int, client_id: str, **kwargs: object) -> tuple[RawSession, int]:
    """A raw session from a chosen loopback address, and its CONNACK code."""
    session = RawSession(port, source=source)
    try:
        return session, session.connect(client_id, **kwargs)
    except BaseException:
        session.close()
        raise


async def test_connections_over_the_per_address_limit_get_connack_3(limited: Harness) -> None:
    port = limited.port  # limit 3 per address; the control device is one from 127.0.0.1
    baseline = limited.snapshot()
    held: list[RawSession] = []
    try:
        codes = []
        for n in range(3):
            session, code = await asyncio.to_thread(connect_from, "127.0.0.1", port, f"02:00:00:00:cc:0{n}")
            held.append(session)
            codes.append(code)
        assert codes == [0, 0, 3]
        other, other_code = await asyncio.to_thread(connect_from, "127.0.0.2", port, "02:00:00:00:cc:09")
        held.append(other)
        assert other_code == 0
    finally:
        for session in held:
            session.close()
    await limited.assert_nothing_left(baseline)
    # The slots are given back when connections end.
    again, code = await asyncio.to_thread(connect_from, "127.0.0.1", port, "02:00:00:00:cc:05")
    again.close()
    assert code == 0


async def test_connections_over_the_global_limit_get_connack_3_before_any_password_check(
    limited: Harness,
) -> None:
    port = limited.port  # limit 4 in all: the control device and three from other addresses
    baseline = limited.snapshot()
    held: list[RawSession] = []
    try:
        for n in range(2, 5):
            session, code = await asyncio.to_thread(
                connect_from, f"127.0.0.{n}", port, f"02:00:00:00:dd:0{n}"
            )
            held.append(session)
            assert code == 0
        checks = limited.server.services.authenticator.stats.bcrypt_checks
        victim = limited.victim.mqtt_username
        session, code = await asyncio.to_thread(
            connect_from, "127.0.0.9", port, victim, username=victim, password=PASSWORD
        )
        held.append(session)
        assert code == 3
        assert limited.server.services.authenticator.stats.bcrypt_checks == checks
        assert limited.server.broker.refused_over_limit == 1
        assert await asyncio.to_thread(session.closed_by_server, CLOSE_WITHIN)
    finally:
        for held_session in held:
            held_session.close()
    await limited.assert_nothing_left(baseline)


async def test_a_subscriber_that_never_reads_has_a_bounded_queue(limited: Harness) -> None:
    # A device subscribes with QoS 1 and then never reads; a back end floods its namespace.
    port = limited.port
    victim = limited.victim
    topic = f"devices/{victim.id}/flood"
    await make_account(limited.server.accounts, "feeder", ["publish devices/#"])
    slow = RawSession(port, source="127.0.0.2")
    feeder = Client(port, "feeder", username="feeder", password=ACCOUNT_PASSWORD)
    try:
        code = await asyncio.to_thread(
            slow.connect, victim.mqtt_username, username=victim.mqtt_username, password=PASSWORD
        )
        assert code == 0
        await asyncio.to_thread(slow.sock.sendall, subscribe((topic.encode(), 1)))
        assert (await asyncio.to_thread(slow.sock.recv, 5)) == b"\x90\x03\x00\x01\x01"  # SUBACK QoS 1
        assert await asyncio.to_thread(feeder.connect) == 0
        payload = b"x" * 16_384
        for _ in range(60):  # ~1 MB: far past the socket buffers and 5 deliveries in progress
            await asyncio.to_thread(feeder.publish, topic, payload)
        session, handler = limited.server.broker.sessions[victim.mqtt_username]
        assert isinstance(handler, KeepAliveHandler)
        dropped = await eventually(_value(lambda: handler.dropped), lambda n: n > 0)
        assert dropped > 0
        assert handler._queued <= 5
        assert len(session.inflight_out) <= 5
        assert limited.server.broker.sessions[victim.mqtt_username][1] is handler
        # The broker keeps serving everyone else meanwhile.
        assert await asyncio.to_thread(
            limited.control.roundtrip, f"devices/{limited.control_device.id}/ok", b"still-served"
        )
    finally:
        slow.close()
        await asyncio.to_thread(feeder.close)


async def test_an_offline_persistent_session_queues_a_bounded_number_of_messages(limited: Harness) -> None:
    port = limited.port
    victim = limited.victim
    topic = f"devices/{victim.id}/offline"
    await make_account(limited.server.accounts, "feeder", ["publish devices/#"])
    with RawSession(port, source="127.0.0.2") as slow:
        code = await asyncio.to_thread(
            slow.connect,
            victim.mqtt_username,
            username=victim.mqtt_username,
            password=PASSWORD,
            clean_session=False,
        )
        assert code == 0
        await asyncio.to_thread(slow.sock.sendall, subscribe((topic.encode(), 1)))
        assert (await asyncio.to_thread(slow.sock.recv, 5)) == b"\x90\x03\x00\x01\x01"
        await asyncio.to_thread(slow.sock.sendall, b"\xe0\x00")  # DISCONNECT: the session stays
    session = limited.server.broker.sessions[victim.mqtt_username][0]
    await eventually(_value(lambda: session.transitions.state), lambda state: state == "disconnected")
    with Client(port, "feeder", username="feeder", password=ACCOUNT_PASSWORD) as feeder:
        assert await asyncio.to_thread(feeder.connect) == 0
        for n in range(12):
            await asyncio.to_thread(feeder.publish, topic, f"m{n}".encode())
        # The feeder's last PUBACK came after its message was queued for broadcast, not after the
        # broadcast: a round trip through the broadcast queue orders it.
        assert await asyncio.to_thread(
            limited.control.roundtrip, f"devices/{limited.control_device.id}/sync", b"sync"
        )
    assert session.retained_messages.qsize() == 5
    assert session.attributes["mqttprov.dropped_while_offline"] == 7


def _value(read: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def current() -> T:
        return read()

    return current
