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
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.embedded import BrokerServer
from broker.embedded.protocol import KeepAliveHandler
from config import Settings
from provisioning.registry import DeviceInfo
from tests.auth_support import (
    ACCOUNT_PASSWORD,
    HOST,
    PASSWORD,
    RawSession,
    eventually,
    make_account,
    make_device,
    polled,
    settings,
)
from tests.bench.mqtt import remaining_length
from tests.helpers import connect_packet
from tests.mqtt_clients import Client

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
            fds=sum(1 for fd in Path("/proc/self/fd").iterdir() if not self._registry_file(fd)),
            tasks=len(asyncio.all_tasks()),
            sessions=frozenset(self.server.broker.sessions),
        )

    def _registry_file(self, fd: Path) -> bool:
        # The connection pool opens database files when presence is written behind, at its own
        # pace: those are not what a connection leaves behind.
        database = self.server.settings.database.url.partition(":///")[2]
        try:
            return str(fd.readlink()).startswith(database)
        except OSError:
            return False  # closed while we looked

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
    async with BrokerServer(config) as server:
        control_device = await make_device(server.registry, CONTROL_MAC)
        victim = await make_device(server.registry, VICTIM_MAC)
        control = Client(
            server.settings.broker.port,
            control_device.mqtt_username,
            username=control_device.mqtt_username,
            password=PASSWORD,
        )
        try:
            assert await asyncio.to_thread(control.connect) == 0
            assert await asyncio.to_thread(control.subscribe, f"devices/{control_device.id}/#") == 1
            yield Harness(server, control, control_device, victim)
        finally:
            await asyncio.to_thread(control.close)


@pytest.fixture
async def harness(sqlite_url: str) -> AsyncIterator[Harness]:
    async with running(hostile_settings(sqlite_url)) as running_harness:
        yield running_harness


def until_closed(sock: socket.socket, within: float = CLOSE_WITHIN) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {within}s; received {received!r}") from None
    return received


def exchange(port: int, steps: list[bytes], *, half_close: bool = False) -> bytes:
    """Send ``steps`` on a fresh connection; everything received until the server closes it."""
    with socket.create_connection((HOST, port), timeout=CLOSE_WITHIN) as sock:
        for step in steps:
            try:
                sock.sendall(step)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed early: the rest could not be sent, which is fine
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return until_closed(sock)


async def repeated(
    harness: Harness, steps: list[bytes], expected: bytes, *, half_close: bool = False
) -> None:
    """The case, REPEATS times: each ends as ``expected`` and nothing piles up."""
    first = await asyncio.to_thread(exchange, harness.port, steps, half_close=half_close)
    assert first == expected
    await harness.assert_nothing_left(harness.snapshot())
    baseline = harness.snapshot()
    for _ in range(REPEATS):
        assert await asyncio.to_thread(exchange, harness.port, steps, half_close=half_close) == expected
    await harness.assert_nothing_left(baseline)


# -- malformed traffic before and in place of a CONNECT --------------------------------------------

PROVISIONING = connect_packet("02:00:00:00:bb:01")  # a well-formed anonymous provisioning CONNECT
_LONG_LENGTH = b"\x10\xff\xff\xff\xff\x01"  # five remaining-length bytes: more than MQTT allows
_SHORTENED = PROVISIONING[:1] + bytes([PROVISIONING[1] - 4]) + PROVISIONING[2:]

# A real MQTT 5 CONNECT: properties (session expiry 10 s) between keep-alive and client id.
_MQTT5_CONNECT = frame(
    0x10,
    field(b"MQTT") + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x05\x11\x00\x00\x00\x0a" + field(b"m5"),
)

BEFORE_CONNECT: dict[str, tuple[list[bytes], bytes]] = {
    # case: (what is sent, everything the server sends before it closes the connection)
    "pingreq-first": ([b"\xc0\x00"], b""),
    "publish-first": ([publish(b"devices/x/y")], b""),
    "subscribe-first": ([subscribe((b"#", 0))], b""),
    "disconnect-first": ([b"\xe0\x00"], b""),
    "protocol-name-MQIsdp": ([connect_raw(b"02:00:00:00:bb:01", name=b"MQIsdp", level=3)], b""),
    "protocol-name-garbage": ([connect_raw(b"02:00:00:00:bb:01", name=b"HTTP/1.1")], b""),
    "protocol-level-3": ([connect_raw(b"02:00:00:00:bb:01", level=3)], connack(1)),
    "protocol-level-5": ([connect_raw(b"02:00:00:00:bb:01", level=5)], connack(1)),
    "mqtt5-connect-with-properties": ([_MQTT5_CONNECT], connack(1)),
    "remaining-length-five-bytes": ([_LONG_LENGTH + b"\x00" * 64], b""),
    "remaining-length-over-packet-limit": ([b"\x10" + remaining_length(200_000_000)], b""),
    "connect-fields-overrun-length": ([_SHORTENED], b""),
    "connect-trailing-bytes": ([frame(0x10, PROVISIONING[2:] + b"\x00\x00")], b""),
    "connect-reserved-flag": ([connect_raw(b"02:00:00:00:bb:01", flags=0x03)], b""),
    "connect-will-qos-3": (
        [connect_raw(b"02:00:00:00:bb:01", flags=0x02 | 0x04 | 0x18, extra=field(b"t") + field(b"m"))],
        b"",
    ),
    "connect-will-qos-without-will": ([connect_raw(b"02:00:00:00:bb:01", flags=0x02 | 0x08)], b""),
    "connect-will-topic-wildcard": (
        [connect_raw(b"02:00:00:00:bb:01", flags=0x02 | 0x04, extra=field(b"devices/#") + field(b"m"))],
        b"",
    ),
    "client-id-invalid-utf8": ([connect_raw(b"\xff\xfe\xfd")], b""),
    "client-id-nul": ([connect_raw(b"02:00:00:00:bb:01\x00")], b""),
    "client-id-overlong-utf8-nul": ([connect_raw(b"ab\xc0\x80")], b""),
    "zero-length-client-id-persistent-session": ([connect_raw(b"", flags=0x00)], connack(2)),
    "password-without-username": (
        [connect_raw(b"02:00:00:00:bb:01", flags=0x42, extra=field(b"pw"))],
        connack(4),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BEFORE_CONNECT))
async def test_malformed_or_missing_connect_is_closed_and_leaves_nothing(harness: Harness, case: str) -> None:
    steps, expected = BEFORE_CONNECT[case]
    await repeated(harness, steps, expected)


SLOW: dict[str, tuple[list[bytes], bool]] = {
    # case: (what is sent, whether the client then half-closes rather than staying silent)
    "slowloris-one-byte": ([b"\x10"], False),
    "slowloris-header-only": ([PROVISIONING[:2]], False),
    "connect-shorter-than-its-length": ([PROVISIONING[:-3]], False),
    "connect-truncated-then-eof": ([PROVISIONING[:-3]], True),
    "nothing-then-eof": ([], True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW))
async def test_a_connect_that_never_finishes_is_closed(harness: Harness, case: str) -> None:
    steps, half_close = SLOW[case]
    await repeated(harness, steps, b"", half_close=half_close)
    assert harness.server.broker.sessions.keys() == {harness.control_device.mqtt_username}


# -- malformed traffic after an accepted CONNECT ---------------------------------------------------

AFTER_CONNECT: dict[str, bytes] = {
    "second-connect": PROVISIONING,
    "publish-invalid-utf8-topic": publish(b"provision/\xff\xfe"),
    "publish-nul-in-topic": publish(b"provision/re\x00quest"),
    "publish-plus-wildcard": publish(b"devices/+/state"),
    "publish-hash-wildcard": publish(b"devices/#"),
    "publish-empty-topic": publish(b""),
    "publish-qos-3": frame(0x36, field(b"provision/request") + b"\x00\x01x"),
    "publish-packet-id-0": publish(b"provision/request", qos=1, packet_id=0),
    "publish-dollar-topic": publish(b"$SYS/broker/x"),
    "publish-over-packet-limit": b"\x30" + remaining_length(10_000_000),
    "subscribe-wrong-flags": subscribe((b"provision/reply/02:00:00:00:bb:01", 1), first=0x80),
    "subscribe-invalid-utf8-filter": subscribe((b"devices/\xc3\x28", 0)),
    "subscribe-nul-in-filter": subscribe((b"devices/\x00/#", 0)),
    "subscribe-no-filters": frame(0x82, b"\x00\x01"),
    "subscribe-qos-byte-3": subscribe((b"provision/reply/02:00:00:00:bb:01", 3)),
    "unsubscribe-no-filters": frame(0xA2, b"\x00\x01"),
    "unsubscribe-invalid-utf8": unsubscribe(b"\xed\xa0\x80"),
    "puback-too-long": frame(0x40, b"\x00\x01\x00"),
    "pingreq-with-body": frame(0xC0, b"\x00"),
    "connack-from-client": connack(0),
    "reserved-type-0": b"\x00\x00",
    "reserved-type-15": b"\xf0\x00",
    "remaining-length-five-bytes": b"\x30\xff\xff\xff\xff\x01",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(AFTER_CONNECT))
async def test_malformed_packet_after_connect_closes_the_connection(harness: Harness, case: str) -> None:
    await repeated(harness, [PROVISIONING, AFTER_CONNECT[case]], CONNACK_ACCEPTED)


@pytest.mark.slow
async def test_a_packet_that_never_finishes_after_connect_is_closed(harness: Harness) -> None:
    # Keep-alive 0 (no keep-alive at all): only the packet timeout can end this one.
    start = connect_packet("02:00:00:00:bb:02", keep_alive=0)
    partial = publish(b"provision/request", b"y" * 100)[:20]
    await repeated(harness, [start, partial], CONNACK_ACCEPTED)


async def test_a_truncated_packet_then_eof_is_cleaned_up(harness: Harness) -> None:
    partial = publish(b"provision/request", b"y" * 100)[:20]
    await repeated(harness, [PROVISIONING, partial], CONNACK_ACCEPTED, half_close=True)


async def test_a_protocol_violation_ends_a_device_session_and_publishes_its_will(harness: Harness) -> None:
    # A will is for a connection that ends abnormally, a protocol error included (MQTT 3.1.1
    # §3.1.2.5). Retained, so the test can read it without a second login to that namespace.
    victim = harness.victim
    will_topic = f"devices/{victim.id}/will"
    with RawSession(harness.port) as session:
        code = await asyncio.to_thread(
            session.connect,
            victim.mqtt_username,
            username=victim.mqtt_username,
            password=PASSWORD,
            will=(will_topic, b"gone"),
            will_retain=True,
        )
        assert code == 0
        await asyncio.to_thread(session.sock.sendall, publish(b"devices/+/bad"))
        assert await asyncio.to_thread(session.closed_by_server, CLOSE_WITHIN)
    found = await eventually(polled(lambda: _retained(harness, will_topic)), lambda data: data is not None)
    assert found == b"gone"
    connected = {
        client_id
        for client_id, (state, _) in harness.server.broker.sessions.items()
        if state.transitions.state == "connected"
    }
    assert victim.mqtt_username not in connected


def _retained(harness: Harness, topic: str) -> bytes | None:
    message = harness.server.broker.retained_messages.get(topic)
    return None if message is None else bytes(message.data)


# -- odd logins ------------------------------------------------------------------------------------


def login(port: int, client_id: str, username: bytes | None, password: bytes | None) -> bytes:
    """A CONNECT with raw username/password fields; what the server sent until it closed."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    extra = b"".join(field(value) for value in (username, password) if value is not None)
    return exchange(port, [connect_raw(client_id.encode(), flags=flags, extra=extra)], half_close=True)


#: Stands for the victim device's username (the client id too, where a case gives none).
VICTIM = b"<victim>"

ODD_LOGINS: dict[str, tuple[str | None, bytes | None, bytes | None, bytes]] = {
    # case: (client id, None for the victim's; username; password; what the server sends)
    "password-73-bytes": (None, VICTIM, PASSWORD.encode() + b"x" * (73 - len(PASSWORD)), connack(4)),
    "password-1000-bytes": (None, VICTIM, b"p" * 1000, connack(4)),
    "password-nul": (None, VICTIM, PASSWORD.encode() + b"\x00", connack(4)),
    "password-only-nul": (None, VICTIM, b"\x00", connack(4)),
    "password-empty": (None, VICTIM, b"", connack(4)),
    "password-invalid-utf8": (None, VICTIM, b"\xff" * 8, connack(4)),
    "username-without-password": (None, VICTIM, None, connack(4)),
    "username-nul": (None, b"device_\x00", PASSWORD.encode(), b""),  # [MQTT-1.5.3-2]: closed
    "username-invalid-utf8": (None, b"device_\xff", PASSWORD.encode(), b""),  # [MQTT-1.5.3-1]
    "username-empty": ("someone", b"", PASSWORD.encode(), connack(5)),
    "username-empty-no-password": ("someone", b"", None, connack(5)),
    "username-sql-or": ("probe-sql", b"' OR '1'='1", b"' OR '1'='1", connack(4)),
    "username-sql-drop": ("probe-sql", b"device_x'; DROP TABLE devices;--", PASSWORD.encode(), connack(4)),
    "username-sql-comment": ("probe-sql", b"admin'--", PASSWORD.encode(), connack(4)),
    "username-like-wildcard": ("probe-like", b"device_%", PASSWORD.encode(), connack(4)),
    "username-hash": ("#", b"#", PASSWORD.encode(), connack(4)),
    "username-plus": ("+", b"+", PASSWORD.encode(), connack(4)),
    "username-topic-filter": ("devices/+/#", b"devices/+/#", PASSWORD.encode(), connack(4)),
    "username-provision-wildcard": ("provision/#", b"provision/#", PASSWORD.encode(), connack(4)),
    "username-4k": ("probe-long", b"device_" + b"u" * 3000, PASSWORD.encode(), connack(4)),
    "username-over-packet-limit": ("probe-long", b"u" * 60_000, PASSWORD.encode(), b""),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ODD_LOGINS))
async def test_odd_logins_are_refused_cleanly(harness: Harness, case: str) -> None:
    client_id, username, password, expected = ODD_LOGINS[case]
    victim = harness.victim.mqtt_username
    if username == VICTIM:
        username = victim.encode()
    devices_before = (await harness.server.registry.list_devices(limit=1)).total

    async def attempt() -> bytes:
        return await asyncio.to_thread(login, harness.port, client_id or victim, username, password)

    assert await attempt() == expected
    await harness.assert_nothing_left(harness.snapshot())
    baseline = harness.snapshot()
    for _ in range(REPEATS):
        assert await attempt() == expected
    await harness.assert_nothing_left(baseline)
    assert (await harness.server.registry.list_devices(limit=1)).total == devices_before
    # The victim's real credentials still work afterwards.
    real = await asyncio.to_thread(login, harness.port, victim, victim.encode(), PASSWORD.encode())
    assert real == CONNACK_ACCEPTED


async def test_a_72_byte_prefix_of_a_long_password_is_not_enough(harness: Harness) -> None:
    # bcrypt looks at 72 bytes only: a stored 72-byte password must not accept longer ones.
    long_password = "L" * 72
    device = await make_device(harness.server.registry, "02:00:00:00:aa:03", long_password)
    user = device.mqtt_username
    ok = await asyncio.to_thread(login, harness.port, user, user.encode(), long_password.encode())
    longer = await asyncio.to_thread(login, harness.port, user, user.encode(), long_password.encode() + b"!")
    assert (ok, longer) == (CONNACK_ACCEPTED, connack(4))


# -- resource limits -------------------------------------------------------------------------------


@pytest.fixture
async def limited(sqlite_url: str) -> AsyncIterator[Harness]:
    config = hostile_settings(
        sqlite_url,
        max_connections=4,
        max_connections_per_address=3,
        max_queued_messages=5,
        max_packet_bytes=65_536,
    )
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        dropped = await eventually(polled(lambda: handler.dropped), lambda n: n > 0)
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
    await eventually(polled(lambda: session.transitions.state), lambda state: state == "disconnected")
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


@pytest.mark.slow
async def test_a_client_that_never_releases_qos2_messages_is_cut_off(limited: Harness) -> None:
    # Anonymous is enough: a provisioning session sends QoS 2 requests and never sends PUBREL.
    # Each would be held until its PUBREL; past max_queued_messages (5) the connection ends.
    baseline = limited.snapshot()
    flood = [publish(b"provision/request", b"{}" * 500, qos=2, packet_id=n) for n in range(1, 41)]
    received = await asyncio.to_thread(exchange, limited.port, [PROVISIONING, *flood])
    assert received.startswith(CONNACK_ACCEPTED)
    pubrecs = received[len(CONNACK_ACCEPTED) :]
    assert len(pubrecs) % 4 == 0
    assert pubrecs == b"".join(b"\x50\x02" + struct.pack("!H", n) for n in range(1, len(pubrecs) // 4 + 1))
    assert len(pubrecs) // 4 <= 5
    await limited.assert_nothing_left(baseline)


@pytest.mark.parametrize(
    "tail", [b"\xe0\x00", b""], ids=["disconnect-in-the-same-write", "eof-in-the-same-write"]
)
async def test_a_connection_that_ends_while_it_is_being_set_up_is_cleaned_up(
    harness: Harness, tail: bytes
) -> None:
    # A persistent session with a message in flight makes setting up take a moment (it is resent).
    await repeated(harness, [PROVISIONING + tail], CONNACK_ACCEPTED, half_close=True)


@pytest.mark.slow
async def test_anonymous_sessions_cannot_leave_persistent_sessions_behind(harness: Harness) -> None:
    # One stored session per made-up MAC would grow the session table (and every broadcast's
    # subscription scan) without bound; an anonymous provisioning session is never kept.
    baseline = harness.snapshot()
    for n in range(10):
        connect = connect_packet(f"02:00:00:00:f0:{n:02x}", clean_session=False)
        reply_filter = f"provision/reply/02:00:00:00:f0:{n:02x}".encode()
        steps = [connect, subscribe((reply_filter, 1)), b"\xe0\x00"]
        received = await asyncio.to_thread(exchange, harness.port, steps)
        assert received == CONNACK_ACCEPTED + b"\x90\x03\x00\x01\x01"
    await harness.assert_nothing_left(baseline)
    assert not any(
        subscriber.client_id.startswith("02:00:00:00:f0")
        for subscribers in harness.server.broker.subscriptions.values()
        for subscriber, _qos in subscribers
    )
