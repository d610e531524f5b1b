"""Broker-layer fixes over amqtt 0.12.1: authenticate before take-over, refusals leave nothing
behind, CONNECT timeout, keep-alive, CONNACK codes. Real sockets on a free loopback port."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import amqtt
import bcrypt
import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session
from paho.mqtt.enums import CallbackAPIVersion

from broker.embedded import BrokerServer
from broker.embedded.amqtt_broker import MqttprovBroker
from broker.embedded.protocol import KeepAliveHandler
from provisioning.registry import DeviceInfo, DeviceRegistry, DeviceStatus
from tests.helpers import broker_settings, connack_code, connect_packet

PASSWORD = "correct-horse-battery-staple-0001"


async def make_device(registry: DeviceRegistry, mac: str, password: str = PASSWORD) -> DeviceInfo:
    """A registered device whose password we know (hashed at the test cost)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return await registry.create_device(mac, status=DeviceStatus.REGISTERED, password_hash=hashed)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    settings = broker_settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", connect_timeout=1.0)
    async with BrokerServer(settings) as running:
        yield running


class Device:
    """A paho client logged in as a device, recording what it receives."""

    def __init__(self, port: int, device: DeviceInfo, *, keepalive: int = 30) -> None:
        self.topic = f"devices/{device.id}/state"
        self.received: list[bytes] = []
        self.got = threading.Event()
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.connack: list[int] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.mqtt_username)
        client.username_pw_set(device.mqtt_username, PASSWORD)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message
        client.on_disconnect = lambda *_: self.disconnected.set()
        self.client = client
        client.connect("127.0.0.1", port, keepalive=keepalive)
        client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        self.connack.append(int(getattr(rc, "value", 0)))
        client.subscribe(f"devices/{self.topic.split('/')[1]}/#", qos=1)

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        self.received.append(bytes(message.payload))
        self.got.set()

    def roundtrip(self, payload: bytes, timeout: float = 5.0) -> bool:
        """Publish to its own namespace and wait until it comes back."""
        self.got.clear()
        self.client.publish(self.topic, payload, qos=1)
        return self.got.wait(timeout) and payload in self.received

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        device.close()


def raw_connect(port: int, client_id: str, **kwargs: object) -> tuple[socket.socket, int]:
    """Open a socket, send CONNECT, return it with the CONNACK code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(connect_packet(client_id, **kwargs))  # type: ignore[arg-type]
    header = sock.recv(4)
    assert header[:2] == b"\x20\x02", header
    return sock, header[3]


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("clean_session", [True, False])
async def test_wrong_password_takeover_does_not_disturb_the_victim(
    server: BrokerServer, devices: list[Device], clean_session: bool
) -> None:
    port = server.settings.broker.port
    victim_info = await make_device(server.registry, "02:00:00:00:00:01")
    victim = await asyncio.to_thread(Device, port, victim_info)
    devices.append(victim)
    assert await asyncio.to_thread(victim.subscribed.wait, 5)
    handler_before = server.broker.sessions[victim_info.mqtt_username][1]

    sock, code = await asyncio.to_thread(
        raw_connect,
        port,
        victim_info.mqtt_username,
        username=victim_info.mqtt_username,
        password="wrong",
        clean_session=clean_session,
    )
    sock.close()

    assert code == 4
    assert server.broker.sessions[victim_info.mqtt_username][1] is handler_before
    assert await asyncio.to_thread(victim.roundtrip, b"still-here")
    assert not victim.disconnected.is_set()


@pytest.mark.slow
async def test_a_valid_second_login_takes_over_as_mqtt_says(
    server: BrokerServer, devices: list[Device]
) -> None:
    port = server.settings.broker.port
    info = await make_device(server.registry, "02:00:00:00:00:02")
    first = await asyncio.to_thread(Device, port, info)
    devices.append(first)
    assert await asyncio.to_thread(first.subscribed.wait, 5)
    first.client.reconnect_delay_set(60, 120)  # keep the loser from fighting back during the test

    second = await asyncio.to_thread(Device, port, info)
    devices.append(second)

    assert await asyncio.to_thread(first.disconnected.wait, 5)
    assert await asyncio.to_thread(second.subscribed.wait, 5)
    assert await asyncio.to_thread(second.roundtrip, b"new-owner")


async def test_refused_connections_leave_no_session_behind(server: BrokerServer) -> None:
    port = server.settings.broker.port
    info = await make_device(server.registry, "02:00:00:00:00:03")
    before = set(server.broker.sessions)
    attempts = [
        {"client_id": "not-a-mac"},
        {"client_id": info.mqtt_username, "username": info.mqtt_username, "password": "nope"},
        {"client_id": "device_000000000000", "username": "device_000000000000", "password": "x"},
        {"client_id": "other", "username": info.mqtt_username, "password": PASSWORD, "clean_session": False},
    ]
    codes = [await asyncio.to_thread(connack_code, "127.0.0.1", port, **a) for a in attempts]  # type: ignore[arg-type]
    assert codes == [5, 4, 4, 5]
    assert set(server.broker.sessions) == before


async def test_connack_codes_for_good_and_bad_credentials(server: BrokerServer) -> None:
    port = server.settings.broker.port
    info = await make_device(server.registry, "02:00:00:00:00:04")
    user = info.mqtt_username
    ok = await asyncio.to_thread(connack_code, "127.0.0.1", port, user, username=user, password=PASSWORD)
    wrong = await asyncio.to_thread(connack_code, "127.0.0.1", port, user, username=user, password="bad")
    assert (ok, wrong) == (0, 4)


@pytest.mark.slow
async def test_a_connection_that_never_sends_connect_is_closed(server: BrokerServer) -> None:
    port = server.settings.broker.port  # connect_timeout is 1 s for this fixture
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(b"\x10")  # the first byte of a CONNECT, then nothing (slowloris)
        assert await asyncio.to_thread(closed_by_server, sock, 10.0)
    finally:
        sock.close()
    assert time.monotonic() - started < 10.0
    assert server.broker.sessions == {}


@pytest.mark.slow
async def test_silent_clients_are_dropped_after_one_and_a_half_keep_alives(server: BrokerServer) -> None:
    port = server.settings.broker.port
    info = await make_device(server.registry, "02:00:00:00:00:05")
    user = info.mqtt_username
    sock, code = await asyncio.to_thread(
        raw_connect, port, user, username=user, password=PASSWORD, keep_alive=1
    )
    try:
        assert code == 0
        # keep-alive 1 s: dropped after 2 s of silence (1.5 x, rounded up), well within 10 s
        assert await asyncio.to_thread(closed_by_server, sock, 10.0)
    finally:
        sock.close()


@pytest.mark.slow
async def test_a_client_that_pings_stays_connected(server: BrokerServer) -> None:
    port = server.settings.broker.port
    info = await make_device(server.registry, "02:00:00:00:00:06")
    user = info.mqtt_username
    sock, code = await asyncio.to_thread(
        raw_connect, port, user, username=user, password=PASSWORD, keep_alive=1
    )
    try:
        assert code == 0
        for _ in range(4):  # 4 pings 0.8 s apart: 3.2 s, past the 2 s grace of a silent client
            await asyncio.to_thread(sock.sendall, b"\xc0\x00")
            assert await asyncio.to_thread(sock.recv, 2) == b"\xd0\x00"
            await asyncio.sleep(0.8)  # the client's own ping interval, not a wait for the server
    finally:
        sock.close()


#: SHA-256 of amqtt 0.12.1's ``Broker._handle_client_session`` source, which
#: ``Accepting._session_lifetime`` copies less its per-CONNECT walk of every filter: a new amqtt
#: that changes the method must be read again (docs/amqtt.md) before this is updated.
SESSION_LIFETIME_SHA256 = "8b1b52a03df9daf58a0e88ab15f4b65a778b6b2289e323f821ed5e42c77c1095"
#: The steps both make, in order.
LIFETIME_STEPS = (
    "await self._authenticate(client_session",
    "client_session.transitions.connect()",
    "await old_session[1].handle_connection_closed()",
    "handler.attach(client_session, reader, writer)",
    "self._sessions[client_session.client_id] = (client_session, handler)",
    "await handler.mqtt_connack_authorize(authenticated)",
    "BrokerEvents.CLIENT_CONNECTED",
    "await handler.start()",
    "await self._publish_session_retained_messages(client_session)",
    "await self._client_message_loop(client_session, handler)",
)


def test_the_session_lifetime_is_amqtts_less_the_walk_of_every_filter() -> None:
    theirs = inspect.getsource(Broker._handle_client_session)
    assert hashlib.sha256(theirs.encode()).hexdigest() == SESSION_LIFETIME_SHA256
    ours = inspect.getsource(MqttprovBroker._session_lifetime)
    for source in (theirs, ours):
        places = [source.index(step) for step in LIFETIME_STEPS]
        assert places == sorted(places)
    assert "for topic in self._subscriptions" in theirs
    assert "await self._publish_retained_messages_for_subscription" not in ours


def test_pinned_amqtt_still_has_the_methods_we_override() -> None:
    # Our overrides replace private amqtt 0.12.1 methods; fail loudly if amqtt changes under us.
    assert amqtt.__version__ == "0.12.1"
    expected = {
        "_initialize_client_session": ["self", "reader", "writer", "remote_address", "remote_port"],
        "_authenticate": ["self", "session", "_"],
        "_publish_retained_messages_for_subscription": ["self", "subscription", "session"],
        "retain_message": ["self", "source_session", "topic_name", "data", "qos"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(Broker, name)).parameters) == params, name
        assert getattr(MqttprovBroker, name) is not getattr(Broker, name), name
    source = inspect.getsource(Broker._handle_client_session)
    assert "await self._authenticate(client_session" in source
    # _CONNECTING: retained messages offered on CONNECT come between these two calls.
    offered = source.index("await self._publish_retained_messages_for_subscription((topic, QOS_0)")
    assert source.index("await self._publish_session_retained_messages(") < offered
    assert offered < source.index("await self._client_message_loop(")
    # Everything else we replace or wrap, by name, on the broker and on its protocol handler.
    for name in (
        "_client_connected",
        "_handle_client_session",
        "_client_message_loop",
        "_handle_message_delivery",
        "_run_broadcast",
        "_publish_session_retained_messages",
        "add_subscription",
    ):
        assert callable(getattr(Broker, name)), name
        assert getattr(MqttprovBroker, name) is not getattr(Broker, name), name
    for name in ("mqtt_publish", "_handle_message_flow", "handle_read_timeout"):
        assert getattr(KeepAliveHandler, name) is not getattr(BrokerProtocolHandler, name), name
    # broker.embedded.framing: the keep-alive bounds the wait for a whole packet, read through its reader.
    reader_loop = inspect.getsource(ProtocolHandler._reader_loop)
    assert "wait_for(MQTTFixedHeader.from_stream(self.reader), timeout=keepalive_timeout)" in reader_loop


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    settings = broker_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'r.db'}",
        max_connections_per_address=3,
        max_queued_messages=5,
    )
    async with BrokerServer(settings) as running:
        yield running


def connect_from(source: str, port: int, client_id: str) -> tuple[socket.socket, int]:
    """Like :func:`raw_connect`, from a chosen loopback source address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(connect_packet(client_id))
    header = sock.recv(4)
    assert header[:2] == b"\x20\x02", header
    return sock, header[3]


async def test_connections_per_address_are_limited_at_connect(limited: BrokerServer) -> None:
    port = limited.settings.broker.port
    held: list[socket.socket] = []
    try:
        codes = []
        for n in range(4):  # provisioning sessions: MAC client ids, no credentials
            sock, code = await asyncio.to_thread(connect_from, "127.0.0.1", port, f"02:00:00:00:01:0{n}")
            held.append(sock)
            codes.append(code)
        other, other_code = await asyncio.to_thread(connect_from, "127.0.0.2", port, "02:00:00:00:01:09")
        held.append(other)
    finally:
        for sock in held:
            sock.close()
    assert codes == [0, 0, 0, 3]
    assert other_code == 0  # another address is not affected
    assert limited.broker.refused_over_limit == 1


async def test_a_subscriber_that_stops_reading_cannot_queue_without_bound(
    limited: BrokerServer, devices: list[Device]
) -> None:
    port = limited.settings.broker.port
    info = await make_device(limited.registry, "02:00:00:00:00:07")
    user = info.mqtt_username
    topic = f"devices/{info.id}/flood"
    # A raw subscriber that subscribes and then never reads again.
    sock, code = await asyncio.to_thread(raw_connect, port, user, username=user, password=PASSWORD)
    assert code == 0
    encoded = topic.encode()
    body = b"\x00\x01" + len(encoded).to_bytes(2, "big") + encoded + b"\x00"
    await asyncio.to_thread(sock.sendall, b"\x82" + bytes([len(body)]) + body)
    assert (await asyncio.to_thread(sock.recv, 5))[:1] == b"\x90"  # SUBACK
    try:
        publisher = limited.broker.sessions[user][1]
        # Publish through the broker itself, large enough to fill the socket buffers.
        payload = b"x" * 65536
        for _ in range(200):
            await limited.broker.internal_message_broadcast(topic, payload, 0)
        handler = limited.broker.sessions[user][1]
        deadline = time.monotonic() + 10
        while handler.dropped == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling broker state against a deadline
        assert handler.dropped > 0
        assert handler._queued <= 5
        assert publisher is handler
        # The broker still serves others.
        other = await make_device(limited.registry, "02:00:00:00:00:08")
        code = await asyncio.to_thread(
            connack_code,
            "127.0.0.1",
            port,
            other.mqtt_username,
            username=other.mqtt_username,
            password=PASSWORD,
        )
        assert code == 0
    finally:
        sock.close()


async def test_incoming_messages_past_the_bound_are_dropped_or_end_the_connection() -> None:
    # The broker has not finished max_queued incoming messages yet (its queue is full): a QoS 0
    # one is dropped and counted, a QoS 1/2 one ends the connection (here still being set up,
    # so the end is kept for when it is).
    session = Session()
    session.client_id = "flooder"
    handler = KeepAliveHandler(None, session)  # no plugin is reached on these paths
    handler.max_queued = 3
    for n in range(3):
        session.delivered_message_queue.put_nowait(n)
    await handler.handle_publish(_publish(qos=0, packet_id=None))
    assert (handler.dropped_incoming, session.delivered_message_queue.qsize()) == (1, 3)
    await handler.handle_publish(_publish(qos=1, packet_id=7))
    assert handler.refused_incoming == 1
    assert 7 not in session.inflight_in
    assert handler._early_end == (None,)


def _publish(*, qos: int, packet_id: int | None) -> PublishPacket:
    return PublishPacket.build(
        topic_name="t", message=b"x", packet_id=packet_id, dup_flag=False, qos=qos, retain=False
    )
