"""MQTT 3.1.1 behaviours devices rely on, checked against the embedded broker.

Raw sockets where the detail matters (QoS and DUP flags, packet identifiers, "session present",
what arrives after a reconnect), paho-mqtt where a real client library's view is the point.
Every principal is real: a provisioned device (the ACL confines it to ``devices/<id>/#``) and
service accounts with narrow rules, so the ACL applies throughout.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker.embedded import BrokerServer
from provisioning.registry import DeviceInfo
from tests.auth_support import (
    ACCOUNT_PASSWORD,
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

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 3, 4, 5, 6, 7
SUBACK, UNSUBACK, PINGRESP = 9, 11, 13
#: Upper bound for anything that should arrive; "does not arrive" is shown by a later sync message.
WAIT = 10.0


@dataclass(frozen=True)
class Packet:
    """One packet the broker sent: type, fixed-header flags and body."""

    kind: int
    flags: int
    body: bytes

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def topic(self) -> str:
        (length,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + length].decode()

    @property
    def packet_id(self) -> int | None:
        """The identifier of a QoS 1/2 PUBLISH or of an acknowledgement."""
        if self.kind != PUBLISH:
            return int(struct.unpack("!H", self.body[:2])[0])
        if not self.qos:
            return None
        start = 2 + len(self.topic.encode())
        return int(struct.unpack("!H", self.body[start : start + 2])[0])

    @property
    def payload(self) -> bytes:
        start = 2 + len(self.topic.encode()) + (2 if self.qos else 0)
        return self.body[start:]


def packet(first: int, body: bytes) -> bytes:
    """Encode one packet."""
    return bytes([first]) + remaining_length(len(body)) + body


def text(value: str) -> bytes:
    """A length-prefixed UTF-8 string."""
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


class Wire(RawSession):
    """An MQTT 3.1.1 client on a plain socket that does exactly what the test says, nothing more.

    Blocking: call through ``asyncio.to_thread``.
    """

    def __init__(self, port: int) -> None:
        super().__init__(port, timeout=WAIT)
        self._next_id = 0

    def open(self, client_id: str, **kwargs: Any) -> tuple[bool, int]:
        """CONNECT (keywords of :func:`tests.helpers.connect_packet`); (session present, code)."""
        self.sock.sendall(connect_packet(client_id, **kwargs))
        connack = self.receive()
        assert connack.kind == 2, connack
        return bool(connack.body[0] & 0x01), connack.body[1]

    def receive(self, timeout: float = WAIT) -> Packet:
        """The next packet from the broker."""
        self.sock.settimeout(timeout)
        first = self._receive(1)[0]
        length, multiplier = 0, 1
        while True:
            byte = self._receive(1)[0]
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                break
            multiplier *= 128
        return Packet(first >> 4, first & 0x0F, self._receive(length) if length else b"")

    def packet_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK; the granted codes (other packets are not expected)."""
        ident = self.packet_id()
        body = struct.pack("!H", ident) + b"".join(text(f) + bytes([q]) for f, q in filters)
        self.sock.sendall(packet(0x82, body))
        suback = self.receive()
        assert (suback.kind, suback.packet_id) == (SUBACK, ident), suback
        return list(suback.body[2:])

    def unsubscribe(self, *filters: str) -> None:
        """UNSUBSCRIBE and wait for the UNSUBACK with the same identifier."""
        ident = self.packet_id()
        self.sock.sendall(packet(0xA2, struct.pack("!H", ident) + b"".join(text(f) for f in filters)))
        unsuback = self.receive()
        assert (unsuback.kind, unsuback.packet_id) == (UNSUBACK, ident), unsuback

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        packet_id: int | None = None,
    ) -> int | None:
        """Send a PUBLISH (no waiting); its packet identifier for QoS 1/2."""
        ident = (packet_id or self.packet_id()) if qos else None
        first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
        body = text(topic) + (struct.pack("!H", ident) if ident is not None else b"") + payload
        self.sock.sendall(packet(first, body))
        return ident

    def ack(self, kind: int, packet_id: int | None) -> None:
        """Send PUBACK, PUBREC, PUBREL or PUBCOMP for ``packet_id``."""
        assert packet_id is not None
        self.sock.sendall(packet((kind << 4) | (0x02 if kind == PUBREL else 0), struct.pack("!H", packet_id)))

    def send(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """PUBLISH and complete the publisher's side of its QoS flow."""
        ident = self.publish(topic, payload, qos=qos, retain=retain)
        if qos == 1:
            assert self.expect(PUBACK).packet_id == ident
        elif qos == 2:
            assert self.expect(PUBREC).packet_id == ident
            self.ack(PUBREL, ident)
            assert self.expect(PUBCOMP).packet_id == ident

    def settle(self, got: Packet) -> None:
        """Complete the receiver's side of the QoS flow of a PUBLISH the broker sent."""
        if got.qos == 1:
            self.ack(PUBACK, got.packet_id)
        elif got.qos == 2:
            self.ack(PUBREC, got.packet_id)
            assert self.expect(PUBREL).packet_id == got.packet_id
            self.ack(PUBCOMP, got.packet_id)

    def expect(self, kind: int) -> Packet:
        """The next packet, which must be of ``kind``."""
        got = self.receive()
        assert got.kind == kind, got
        return got

    def collect_until(self, topic: str, payload: bytes) -> list[Packet]:
        """Every packet up to and including the PUBLISH of ``payload`` on ``topic`` (QoS 0 acked)."""
        seen: list[Packet] = []
        while True:
            got = self.receive()
            seen.append(got)
            if got.kind == PUBLISH and got.qos == 1:
                self.ack(PUBACK, got.packet_id)
            if got.kind == PUBLISH and got.topic == topic and got.payload == payload:
                return seen

    def disconnect(self) -> None:
        """A clean DISCONNECT (no will), then close."""
        self.sock.sendall(b"\xe0\x00")
        self.close()


@dataclass
class World:
    """A broker, one device and two service accounts."""

    server: BrokerServer
    device: DeviceInfo
    other: DeviceInfo

    @property
    def port(self) -> int:
        return self.server.settings.broker.port

    @property
    def ns(self) -> str:
        """The device's namespace, without the trailing ``#``."""
        return f"devices/{self.device.id}/"

    def device_wire(self, **kwargs: Any) -> tuple[Wire, tuple[bool, int]]:
        """The device logged in on a raw socket: (wire, (session present, code))."""
        wire = Wire(self.port)
        user = self.device.mqtt_username
        try:
            return wire, wire.open(user, username=user, password=PASSWORD, **kwargs)
        except BaseException:
            wire.close()
            raise

    def account_wire(self, name: str, **kwargs: Any) -> Wire:
        """A service account logged in on a raw socket (fails unless accepted)."""
        wire = Wire(self.port)
        try:
            assert wire.open(name, username=name, password=ACCOUNT_PASSWORD, **kwargs)[1] == 0
        except BaseException:
            wire.close()
            raise
        return wire


@pytest.fixture
async def world(sqlite_url: str) -> AsyncIterator[World]:
    async with BrokerServer(settings(sqlite_url, broker={"connect_timeout": 2.0})) as server:
        device = await make_device(server.registry, "02:00:00:00:ee:01")
        other = await make_device(server.registry, "02:00:00:00:ee:02")
        # feeder publishes into any device namespace; watcher reads them all.
        await make_account(
            server.accounts, "feeder", ["publish devices/#", "subscribe feeder/#", "publish feeder/#"]
        )
        await make_account(
            server.accounts, "watcher", ["subscribe devices/#", "subscribe watcher/#", "publish watcher/#"]
        )
        yield World(server, device, other)


def sync(wire: Wire, topic: str) -> list[Packet]:
    """Publish a marker to a topic ``wire`` subscribes to; what arrived before it, marker excluded.

    The broker handles one session's packets and one broadcast at a time in order, so anything
    it would have sent this session before the marker is here by the time the marker is.
    """
    marker = f"sync-{id(wire)}-{topic}".encode()
    wire.publish(topic, marker)
    return wire.collect_until(topic, marker)[:-1]


def publishes(packets: list[Packet]) -> list[Packet]:
    """Only the PUBLISH packets."""
    return [p for p in packets if p.kind == PUBLISH]


# -- keep-alive and the will -----------------------------------------------------------------------


@pytest.mark.slow
async def test_keep_alive_drops_a_silent_client_and_publishes_its_will(world: World) -> None:
    will_topic = world.ns + "status"
    watcher = await asyncio.to_thread(world.account_wire, "watcher")
    try:
        assert await asyncio.to_thread(watcher.subscribe, (world.ns + "#", 1)) == [1]
        wire, (_present, code) = await asyncio.to_thread(
            world.device_wire, keep_alive=1, will=(will_topic, b"lost")
        )
        assert code == 0
        # Silent past 1.5 x 1 s: the broker closes it, as a lost link, and the will goes out.
        assert await asyncio.to_thread(wire.closed_by_server, WAIT)
        wire.close()
        will = await asyncio.to_thread(watcher.receive)
        assert (will.kind, will.topic, will.payload, will.qos) == (PUBLISH, will_topic, b"lost", 0)
    finally:
        watcher.close()


async def test_the_will_goes_out_on_a_lost_connection_but_not_after_disconnect(world: World) -> None:
    will_topic = world.ns + "status"
    watcher = await asyncio.to_thread(world.account_wire, "watcher", clean_session=True)
    try:
        await asyncio.to_thread(watcher.subscribe, (world.ns + "#", 1), ("watcher/#", 0))
        polite, (_p, code) = await asyncio.to_thread(world.device_wire, will=(will_topic, b"polite"))
        assert code == 0
        await asyncio.to_thread(polite.disconnect)
        lost, (_p, code) = await asyncio.to_thread(world.device_wire, will=(will_topic, b"lost"))
        assert code == 0
        lost.close()  # no DISCONNECT: a lost link
        got = await asyncio.to_thread(watcher.receive)
        assert (got.topic, got.payload) == (will_topic, b"lost")
        assert publishes(await asyncio.to_thread(sync, watcher, "watcher/sync")) == []
    finally:
        watcher.close()


async def test_paho_sees_its_will_published_when_its_link_dies(world: World) -> None:
    # The same through a real client library: paho's will, its connection cut under it.
    will_topic = world.ns + "status"
    user = world.device.mqtt_username
    with Client(world.port, "watcher", username="watcher", password=ACCOUNT_PASSWORD) as watcher:
        assert await asyncio.to_thread(watcher.connect) == 0
        assert await asyncio.to_thread(watcher.subscribe, world.ns + "#") == 1
        device = Client(world.port, user, username=user, password=PASSWORD, will=(will_topic, b"bye"))
        try:
            assert await asyncio.to_thread(device.connect) == 0
            sock = device._client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)  # the link dies; paho never sends DISCONNECT
            got = await asyncio.to_thread(watcher.wait_for, lambda m: m.topic == will_topic)
            assert await asyncio.to_thread(device.disconnected.wait, WAIT)
        finally:
            device.close()
        assert got is not None
        assert got.payload == b"bye"


# -- QoS 1 and QoS 2 flows -------------------------------------------------------------------------


async def test_qos1_flow_both_ways(world: World) -> None:
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        assert code == 0
        assert await asyncio.to_thread(device.subscribe, (world.ns + "in", 1)) == [1]
        ident = await asyncio.to_thread(feeder.publish, world.ns + "in", b"one", qos=1, packet_id=77)
        puback = await asyncio.to_thread(feeder.expect, PUBACK)
        assert puback.packet_id == ident == 77
        got = await asyncio.to_thread(device.expect, PUBLISH)
        assert (got.topic, got.payload, got.qos, got.dup, got.retain) == (
            world.ns + "in",
            b"one",
            1,
            False,
            False,
        )
        assert got.packet_id
        await asyncio.to_thread(device.ack, PUBACK, got.packet_id)
        assert publishes(await asyncio.to_thread(sync, device, world.ns + "in")) == []
    finally:
        device.close()
        feeder.close()


async def test_qos2_flow_both_ways_delivers_exactly_once(world: World) -> None:
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        assert code == 0
        assert await asyncio.to_thread(device.subscribe, (world.ns + "in", 2)) == [2]
        topic = world.ns + "in"
        await asyncio.to_thread(feeder.publish, topic, b"two", qos=2, packet_id=9)
        assert (await asyncio.to_thread(feeder.expect, PUBREC)).packet_id == 9
        # The publisher did not see the PUBREC in time and sends the PUBLISH again (DUP).
        await asyncio.to_thread(feeder.publish, topic, b"two", qos=2, packet_id=9, dup=True)
        assert (await asyncio.to_thread(feeder.expect, PUBREC)).packet_id == 9
        await asyncio.to_thread(feeder.ack, PUBREL, 9)
        assert (await asyncio.to_thread(feeder.expect, PUBCOMP)).packet_id == 9

        got = await asyncio.to_thread(device.expect, PUBLISH)
        assert (got.payload, got.qos) == (b"two", 2)
        await asyncio.to_thread(device.ack, PUBREC, got.packet_id)
        pubrel = await asyncio.to_thread(device.expect, PUBREL)
        assert pubrel.flags == 0x02
        assert pubrel.packet_id == got.packet_id
        await asyncio.to_thread(device.ack, PUBCOMP, got.packet_id)
        assert publishes(await asyncio.to_thread(sync, device, topic)) == []  # exactly once
    finally:
        device.close()
        feeder.close()


# -- redelivery to a persistent session ------------------------------------------------------------


async def test_unacknowledged_qos1_is_sent_again_with_dup_after_reconnect(world: World) -> None:
    topic = world.ns + "cmd"
    device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        assert (present, code) == (False, 0)
        assert await asyncio.to_thread(device.subscribe, (topic, 1)) == [1]
        await asyncio.to_thread(feeder.publish, topic, b"must-arrive", qos=1)
        await asyncio.to_thread(feeder.expect, PUBACK)
        first = await asyncio.to_thread(device.expect, PUBLISH)
        assert (first.payload, first.qos, first.dup) == (b"must-arrive", 1, False)
        device.close()  # the link dies before the device could acknowledge

        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        again = await asyncio.to_thread(device.expect, PUBLISH)
        assert (again.payload, again.qos, again.dup) == (b"must-arrive", 1, True)
        assert again.packet_id == first.packet_id
        await asyncio.to_thread(device.ack, PUBACK, again.packet_id)
        # Acknowledged now: a third connection gets nothing again.
        device.close()
        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        assert publishes(await asyncio.to_thread(sync, device, topic)) == []
    finally:
        device.close()
        feeder.close()


async def test_unacknowledged_qos2_is_sent_again_after_reconnect(world: World) -> None:
    topic = world.ns + "cmd"
    device, (_present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        assert code == 0
        assert await asyncio.to_thread(device.subscribe, (topic, 2)) == [2]
        await asyncio.to_thread(feeder.publish, topic, b"q2", qos=2, packet_id=5)
        await asyncio.to_thread(feeder.expect, PUBREC)
        await asyncio.to_thread(feeder.ack, PUBREL, 5)
        await asyncio.to_thread(feeder.expect, PUBCOMP)
        first = await asyncio.to_thread(device.expect, PUBLISH)
        assert (first.payload, first.qos) == (b"q2", 2)
        device.close()  # no PUBREC

        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        again = await asyncio.to_thread(device.expect, PUBLISH)
        assert (again.payload, again.qos, again.dup, again.packet_id) == (b"q2", 2, True, first.packet_id)
        await asyncio.to_thread(device.ack, PUBREC, again.packet_id)
        await asyncio.to_thread(device.expect, PUBREL)
        device.close()  # PUBREL received, PUBCOMP never sent

        # [MQTT-4.4.0-1]: after PUBREC the broker resends PUBREL, not the message.
        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        pubrel = await asyncio.to_thread(device.expect, PUBREL)
        assert pubrel.packet_id == first.packet_id
        await asyncio.to_thread(device.ack, PUBCOMP, pubrel.packet_id)
        assert publishes(await asyncio.to_thread(sync, device, topic)) == []
    finally:
        device.close()
        feeder.close()


async def test_messages_published_while_offline_arrive_on_reconnect(world: World) -> None:
    topic = world.ns + "cmd"
    device, (_p, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
    assert code == 0
    assert await asyncio.to_thread(device.subscribe, (topic, 2)) == [2]
    await asyncio.to_thread(device.disconnect)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        for qos, payload in ((0, b"q0"), (1, b"q1"), (2, b"q2")):
            await asyncio.to_thread(feeder.send, topic, payload, qos=qos)
        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        got = [await asyncio.to_thread(device.expect, PUBLISH) for _ in range(2)]
        # QoS 0 is not queued for an offline session (MQTT 3.1.1 §3.1.2.4 makes it optional);
        # QoS 1 and 2 arrive in order, at their own QoS, without RETAIN.
        assert [(p.payload, p.qos, p.retain) for p in got] == [(b"q1", 1, False), (b"q2", 2, False)]
        for message in got:
            await asyncio.to_thread(device.settle, message)
    finally:
        device.close()
        feeder.close()


# -- clean session, unsubscribe --------------------------------------------------------------------


async def test_a_persistent_session_keeps_its_subscriptions_and_a_clean_one_drops_them(world: World) -> None:
    topic = world.ns + "cmd"
    device, (present, _c) = await asyncio.to_thread(world.device_wire, clean_session=False)
    assert present is False
    assert await asyncio.to_thread(device.subscribe, (topic, 1)) == [1]
    await asyncio.to_thread(device.disconnect)

    # Resumed: "session present", and the subscription works without subscribing again.
    device, (present, _c) = await asyncio.to_thread(world.device_wire, clean_session=False)
    assert present is True
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        await asyncio.to_thread(feeder.publish, topic, b"kept", qos=1)
        await asyncio.to_thread(feeder.expect, PUBACK)
        got = await asyncio.to_thread(device.expect, PUBLISH)
        assert got.payload == b"kept"
        await asyncio.to_thread(device.ack, PUBACK, got.packet_id)
        await asyncio.to_thread(device.disconnect)

        # A clean session discards the stored one [MQTT-3.1.2-6]: not present, nothing subscribed.
        device, (present, _c) = await asyncio.to_thread(world.device_wire, clean_session=True)
        assert present is False
        assert await asyncio.to_thread(device.subscribe, (world.ns + "control", 0)) == [0]
        await asyncio.to_thread(feeder.publish, topic, b"dropped", qos=1)
        await asyncio.to_thread(feeder.expect, PUBACK)
        assert publishes(await asyncio.to_thread(sync, device, world.ns + "control")) == []
        await asyncio.to_thread(device.disconnect)

        # ... and the clean session ended with its connection: nothing to resume afterwards.
        device, (present, _c) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert present is False
    finally:
        device.close()
        feeder.close()


async def test_unsubscribe_stops_delivery(world: World) -> None:
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    try:
        assert code == 0
        assert await asyncio.to_thread(device.subscribe, (world.ns + "a", 1), (world.ns + "b", 0)) == [1, 0]
        await asyncio.to_thread(device.publish, world.ns + "a", b"before")
        assert (await asyncio.to_thread(device.expect, PUBLISH)).payload == b"before"
        await asyncio.to_thread(device.unsubscribe, world.ns + "a")
        await asyncio.to_thread(device.publish, world.ns + "a", b"after")
        assert publishes(await asyncio.to_thread(sync, device, world.ns + "b")) == []
        # Unsubscribing from a filter never subscribed still gets its UNSUBACK [MQTT-3.10.4-5].
        await asyncio.to_thread(device.unsubscribe, world.ns + "never")
    finally:
        device.close()


# -- retained messages -----------------------------------------------------------------------------


async def test_retained_messages_and_their_clearing(world: World) -> None:
    topic = world.ns + "state"
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    try:
        assert code == 0
        await asyncio.to_thread(device.subscribe, (world.ns + "live", 1))
        await asyncio.to_thread(device.publish, topic, b"on", qos=0, retain=True)
        await asyncio.to_thread(sync, device, world.ns + "live")  # the retain has been handled

        watcher = await asyncio.to_thread(world.account_wire, "watcher")
        try:
            # A new subscription gets the retained message with RETAIN set, at most at its QoS.
            assert await asyncio.to_thread(watcher.subscribe, (world.ns + "#", 2)) == [2]
            got = await asyncio.to_thread(watcher.expect, PUBLISH)
            assert (got.topic, got.payload, got.retain, got.qos) == (topic, b"on", True, 0)
            # A live subscriber gets a new retained publish as a normal message [MQTT-3.3.1-9].
            await asyncio.to_thread(device.publish, topic, b"off", qos=1, retain=True)
            await asyncio.to_thread(device.expect, PUBACK)
            live = await asyncio.to_thread(watcher.expect, PUBLISH)
            assert (live.payload, live.retain, live.qos) == (b"off", False, 1)
            await asyncio.to_thread(watcher.ack, PUBACK, live.packet_id)
            # An empty retained payload clears it [MQTT-3.3.1-10], and is delivered as usual.
            await asyncio.to_thread(device.publish, topic, b"", retain=True)
            cleared = await asyncio.to_thread(watcher.expect, PUBLISH)
            assert (cleared.payload, cleared.retain) == (b"", False)
        finally:
            watcher.close()
        await asyncio.to_thread(sync, device, world.ns + "live")
        assert topic not in world.server.broker.retained_messages
        late = await asyncio.to_thread(world.account_wire, "watcher")
        try:
            await asyncio.to_thread(late.subscribe, (world.ns + "#", 1), ("watcher/#", 0))
            assert publishes(await asyncio.to_thread(sync, late, "watcher/sync")) == []
        finally:
            late.close()
    finally:
        device.close()


# -- overlapping subscriptions, $-topics, QoS never raised ----------------------------------------


async def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_granted_qos(world: World) -> None:
    # What we document: one copy per session, at the highest QoS of the matching subscriptions,
    # never above the published QoS (MQTT 3.1.1 §3.3.5 allows this or one copy per subscription).
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    try:
        assert code == 0
        granted = await asyncio.to_thread(
            device.subscribe, (world.ns + "#", 0), (world.ns + "+/x", 1), (world.ns + "a/x", 2)
        )
        assert granted == [0, 1, 2]
        for published in (0, 1, 2):
            payload = f"p{published}".encode()
            # The broker may send the copy before it finishes our own QoS 2 flow: read both.
            await asyncio.to_thread(device.publish, world.ns + "a/x", payload, qos=published)
            got = await asyncio.to_thread(_own_flow_and_copy, device, published)
            assert (got.payload, got.qos) == (payload, published)
            await asyncio.to_thread(device.settle, got)
            assert publishes(await asyncio.to_thread(sync, device, world.ns + "sync")) == []
    finally:
        device.close()


@pytest.mark.slow
@pytest.mark.parametrize(("published", "granted"), [(0, 2), (1, 2), (0, 1), (2, 1), (2, 0), (1, 0)])
async def test_a_subscriber_never_gets_a_higher_qos_than_published(
    world: World, published: int, granted: int
) -> None:
    topic = world.ns + "q"
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        assert code == 0
        assert await asyncio.to_thread(device.subscribe, (topic, granted)) == [granted]
        ident = await asyncio.to_thread(feeder.publish, topic, b"m", qos=published)
        if published == 2:
            await asyncio.to_thread(feeder.expect, PUBREC)
            await asyncio.to_thread(feeder.ack, PUBREL, ident)
        got = await asyncio.to_thread(device.expect, PUBLISH)
        assert got.qos == min(published, granted)
    finally:
        device.close()
        feeder.close()


async def test_dollar_topics_are_not_matched_by_leading_wildcards(world: World) -> None:
    await make_account(
        world.server.accounts, "everything", ["subscribe #", "subscribe +/status", "publish x/#"]
    )
    await make_account(world.server.accounts, "system", ["subscribe $SYS/#"])
    everything = await asyncio.to_thread(world.account_wire, "everything")
    system = await asyncio.to_thread(world.account_wire, "system")
    try:
        assert await asyncio.to_thread(everything.subscribe, ("#", 0), ("+/status", 0)) == [0, 0]
        assert await asyncio.to_thread(system.subscribe, ("$SYS/status", 0)) == [0]
        await world.server.broker.announce("$SYS/status", b"up")
        got = await asyncio.to_thread(system.expect, PUBLISH)
        assert (got.topic, got.payload) == ("$SYS/status", b"up")  # the positive control
        seen = publishes(await asyncio.to_thread(sync, everything, "x/sync"))
        assert [p.topic for p in seen] == []
    finally:
        everything.close()
        system.close()


def _own_flow_and_copy(device: Wire, published: int) -> Packet:
    """Finish the device's own publish flow; the one copy of it the broker sends back."""
    copies: list[Packet] = []
    acks = {0: [], 1: [PUBACK], 2: [PUBREC, PUBCOMP]}[published]
    while acks or not copies:
        got = device.receive()
        if got.kind == PUBLISH:
            copies.append(got)
            continue
        assert got.kind == acks.pop(0), got
        if got.kind == PUBREC:
            device.ack(PUBREL, got.packet_id)
    assert len(copies) == 1, copies
    return copies[0]


def test_wire_packet_parsing() -> None:
    # The test client itself: a QoS 1 PUBLISH with DUP and RETAIN, and an acknowledgement.
    raw = packet(0x3B, text("a/b") + b"\x00\x07" + b"hi")
    parsed = Packet(raw[0] >> 4, raw[0] & 0x0F, raw[2:])
    assert (parsed.topic, parsed.qos, parsed.dup, parsed.retain, parsed.packet_id, parsed.payload) == (
        "a/b",
        1,
        True,
        True,
        7,
        b"hi",
    )
    assert Packet(PUBACK, 0, b"\x01\x02").packet_id == 0x0102


async def test_a_resumed_session_is_not_sent_retained_messages_again(world: World) -> None:
    # Retained messages go to *new* subscriptions [MQTT-3.3.1-6]; a persistent session's
    # subscriptions are not new when it reconnects (a retained "reboot" must not run every time).
    topic = world.ns + "config"
    device, (_p, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
    try:
        assert code == 0
        await asyncio.to_thread(device.publish, topic, b"v1", qos=1, retain=True)
        await asyncio.to_thread(device.expect, PUBACK)
        assert await asyncio.to_thread(device.subscribe, (world.ns + "#", 1)) == [1]
        got = await asyncio.to_thread(device.expect, PUBLISH)
        assert (got.topic, got.payload, got.retain) == (topic, b"v1", True)
        await asyncio.to_thread(device.ack, PUBACK, got.packet_id)
        await asyncio.to_thread(sync, device, world.ns + "sync")
        await asyncio.to_thread(device.disconnect)

        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        assert publishes(await asyncio.to_thread(sync, device, world.ns + "sync")) == []
    finally:
        device.close()


async def test_a_take_over_hands_unacknowledged_messages_to_the_new_connection(world: World) -> None:
    topic = world.ns + "cmd"
    old, (_p, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    new: Wire | None = None
    try:
        assert code == 0
        assert await asyncio.to_thread(old.subscribe, (topic, 1)) == [1]
        await asyncio.to_thread(feeder.publish, topic, b"in-flight", qos=1)
        await asyncio.to_thread(feeder.expect, PUBACK)
        first = await asyncio.to_thread(old.expect, PUBLISH)
        # The device reboots; its old TCP connection is still open as far as the broker knows.
        new, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        again = await asyncio.to_thread(new.expect, PUBLISH)
        assert (again.payload, again.dup, again.packet_id) == (b"in-flight", True, first.packet_id)
        assert await asyncio.to_thread(old.closed_by_server, WAIT)
    finally:
        old.close()
        feeder.close()
        if new is not None:
            new.close()


@pytest.mark.slow
async def test_a_disconnect_while_messages_are_being_resent_ends_the_session(world: World) -> None:
    # The resend happens while amqtt is still setting the connection up; a DISCONNECT (or a lost
    # link) then was dropped and the session stayed "connected" on a closed socket for good.
    topic = world.ns + "cmd"
    device, (_p, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
    feeder = await asyncio.to_thread(world.account_wire, "feeder")
    try:
        assert code == 0
        assert await asyncio.to_thread(device.subscribe, (topic, 1)) == [1]
        await asyncio.to_thread(feeder.send, topic, b"pending", qos=1)
        await asyncio.to_thread(device.expect, PUBLISH)
        device.close()
        device, (present, code) = await asyncio.to_thread(world.device_wire, clean_session=False)
        assert (present, code) == (True, 0)
        assert (await asyncio.to_thread(device.expect, PUBLISH)).dup
        await asyncio.to_thread(device.sock.sendall, b"\xe0\x00")  # DISCONNECT, no PUBACK
        assert await asyncio.to_thread(device.closed_by_server, WAIT)
        session = world.server.broker.sessions[world.device.mqtt_username][0]
        state = await eventually(polled(lambda: session.transitions.state), lambda s: s == "disconnected")
        assert state == "disconnected"
    finally:
        device.close()
        feeder.close()


async def test_subscribing_again_replaces_the_qos_and_resends_retained(world: World) -> None:
    # [MQTT-3.8.4-3]: a SUBSCRIBE for a filter the session already has replaces that
    # subscription (its QoS), and the retained messages are sent again.
    topic = world.ns + "state"
    device, (_p, code) = await asyncio.to_thread(world.device_wire)
    try:
        assert code == 0
        await asyncio.to_thread(device.send, topic, b"kept", qos=2, retain=True)
        assert await asyncio.to_thread(device.subscribe, (topic, 0)) == [0]
        first = await asyncio.to_thread(device.expect, PUBLISH)
        assert (first.payload, first.retain, first.qos) == (b"kept", True, 0)
        assert await asyncio.to_thread(device.subscribe, (topic, 2)) == [2]
        again = await asyncio.to_thread(device.expect, PUBLISH)
        assert (again.payload, again.retain, again.qos) == (b"kept", True, 2)
        await asyncio.to_thread(device.settle, again)
        await asyncio.to_thread(device.publish, topic, b"new", qos=2)
        got = await asyncio.to_thread(_own_flow_and_copy, device, 2)
        assert (got.payload, got.qos) == (b"new", 2)
        await asyncio.to_thread(device.settle, got)
    finally:
        device.close()
