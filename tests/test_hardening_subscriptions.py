"""The broker's subscription table: entries go when nobody holds them, and what one session may
put there is bounded ([broker] limits). Real broker on a free port, raw sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from broker.embedded import BrokerServer
from tests.auth_support import ACCOUNT_PASSWORD, HOST, eventually, make_account, polled, settings
from tests.bench.mqtt import remaining_length
from tests.helpers import connect_packet

SUBACK_FAILURE = 0x80
MAC = "02:00:00:00:5b:01"
#: Every notation of MAC a provisioning session may subscribe its reply topic with.
SPELLINGS = ("02:00:00:00:5b:01", "02-00-00-00-5B-01", "0200.0000.5b01", "020000005B01")


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


class Wire:
    """One raw MQTT connection: CONNECT, SUBSCRIBE and UNSUBSCRIBE with any number of filters."""

    def __init__(self, port: int, client_id: str, **connect: object) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.sendall(connect_packet(client_id, **connect))  # type: ignore[arg-type]
        kind, body = self.packet()
        assert kind == 0x20, f"not a CONNACK: {kind:#x}"
        self.session_present, self.code = body[0] & 1, body[1]
        self._packet_id = 0
        #: PUBLISH packets received (topic, payload) while waiting for something else.
        self.published: list[tuple[str, bytes]] = []

    def subscribe(self, filters: Iterable[str], qos: int = 1) -> list[int]:
        """One SUBSCRIBE carrying ``filters``; the SUBACK's return codes."""
        packet_id = self._next_id()
        body = struct.pack("!H", packet_id) + b"".join(_text(f) + bytes([qos]) for f in filters)
        self.sock.sendall(bytes([0x82]) + remaining_length(len(body)) + body)
        return list(self.wait_for(0x90, packet_id)[2:])

    def unsubscribe(self, filters: Iterable[str]) -> None:
        """One UNSUBSCRIBE carrying ``filters``; returns at its UNSUBACK."""
        packet_id = self._next_id()
        body = struct.pack("!H", packet_id) + b"".join(_text(f) for f in filters)
        self.sock.sendall(bytes([0xA2]) + remaining_length(len(body)) + body)
        self.wait_for(0xB0, packet_id)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """A QoS 1 PUBLISH; returns at its PUBACK."""
        packet_id = self._next_id()
        body = _text(topic) + struct.pack("!H", packet_id) + payload
        self.sock.sendall(bytes([0x32 | int(retain)]) + remaining_length(len(body)) + body)
        self.wait_for(0x40, packet_id)

    def ping(self) -> None:
        """PINGREQ and its PINGRESP: everything sent to this connection before is here by then."""
        self.sock.sendall(b"\xc0\x00")
        self.wait_for(0xD0, None)

    def wait_published(self, count: int) -> list[tuple[str, bytes]]:
        """Read until ``count`` PUBLISH packets have arrived in all (fails at the socket timeout)."""
        while len(self.published) < count:
            got, body = self.packet()
            assert got & 0xF0 == 0x30, f"expected a PUBLISH, got {got:#x}"
            self._published(got, body)
        return self.published

    def wait_for(self, kind: int, packet_id: int | None) -> bytes:
        """Read packets until one of ``kind`` (with ``packet_id``) arrives; its body."""
        while True:
            got, body = self.packet()
            if got & 0xF0 == 0x30:
                self._published(got, body)
                continue
            if got == kind and (packet_id is None or struct.unpack("!H", body[:2])[0] == packet_id):
                return body
            raise AssertionError(f"expected {kind:#x}, got {got:#x}")

    def closed_by_server(self, within: float = 10.0) -> bool:
        """True when the broker closes the connection within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            while True:
                got, body = self.packet()
                if got & 0xF0 == 0x30:
                    self._published(got, body)
        except (ConnectionError, OSError):
            return True

    def packet(self) -> tuple[int, bytes]:
        """The next packet: first header byte and body."""
        first = self._exactly(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, self._exactly(length)

    def close(self) -> None:
        """Close the socket without DISCONNECT."""
        self.sock.close()

    def disconnect(self) -> None:
        """DISCONNECT, then close."""
        try:
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()

    def _published(self, first: int, body: bytes) -> None:
        (size,) = struct.unpack("!H", body[:2])
        topic = body[2 : 2 + size].decode()
        offset = 2 + size + (2 if first & 0x06 else 0)
        self.published.append((topic, body[offset:]))
        if first & 0x06:  # acknowledge QoS 1 (and 2's PUBREC) so nothing is held for us
            packet_id = body[2 + size : 4 + size]
            self.sock.sendall((b"\x40\x02" if first & 0x06 == 0x02 else b"\x50\x02") + packet_id)

    def _next_id(self) -> int:
        self._packet_id = self._packet_id % 65_535 + 1
        return self._packet_id

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    async with BrokerServer(settings(url)) as running:
        await make_account(running.accounts, "svc", ["subscribe devices/#", "publish devices/#"])
        yield running


def entries(server: BrokerServer) -> int:
    """How many filters the broker's subscription table holds (amqtt's own attribute); its
    index for publish fan-out holds exactly the same ones."""
    held = len(server.broker.subscriptions)
    assert len(server.broker._filters) == held
    return held


@pytest.mark.slow
async def test_unsubscribe_and_session_end_remove_emptied_entries(server: BrokerServer) -> None:
    port = server.settings.broker.port
    baseline = entries(server)
    account = {"username": "svc", "password": ACCOUNT_PASSWORD}

    def churn() -> list[int]:
        seen: list[int] = []
        for cycle in range(3):
            # A persistent session: subscribed, unsubscribed, and the same again after a resume.
            wire = Wire(port, "svc-churn", clean_session=False, **account)
            assert wire.code == 0
            filters = [f"devices/{cycle}/{n}/+" for n in range(25)]
            assert SUBACK_FAILURE not in wire.subscribe(filters[:20])
            assert SUBACK_FAILURE not in wire.subscribe(filters[20:])
            seen.append(entries(server))
            wire.unsubscribe(filters)
            seen.append(entries(server))
            wire.disconnect()
            # A provisioning session: every spelling of its reply topic in turn.
            with_mac = Wire(port, MAC)
            for spelling in SPELLINGS:
                assert with_mac.subscribe([f"provision/reply/{spelling}"]) != [SUBACK_FAILURE]
                with_mac.unsubscribe([f"provision/reply/{spelling}"])
            seen.append(entries(server))
            with_mac.close()
        for leaver in range(3):
            # Clean sessions that leave holding their filters: their end removes them.
            wire = Wire(port, f"svc-leaver-{leaver}", **account)
            assert SUBACK_FAILURE not in wire.subscribe([f"devices/leaver/{n}" for n in range(10)])
            wire.close()
        # Resuming the persistent session with clean session 1 ends what it held.
        wire = Wire(port, "svc-churn", **account)
        wire.disconnect()
        return seen

    seen = await asyncio.to_thread(churn)
    assert seen[0::3] == [baseline + 25] * 3
    assert seen[1::3] + seen[2::3] == [baseline] * 6
    # Clean sessions are removed by amqtt's session monitor (once a second).
    assert await eventually(polled(lambda: entries(server)), lambda n: n == baseline) == baseline
    assert not any(s.clean_session is False for s, _ in server.broker.sessions.values())


# -- [broker] limits --------------------------------------------------------------------------------


async def test_filters_past_the_limit_of_one_subscribe_are_refused(server: BrokerServer) -> None:
    limit = server.settings.broker.max_filters_per_subscribe
    baseline = entries(server)

    def subscribe_many() -> tuple[list[int], int]:
        wire = Wire(server.settings.broker.port, "svc-many", username="svc", password=ACCOUNT_PASSWORD)
        try:
            codes = wire.subscribe([f"devices/many/{n}" for n in range(limit * 50)])
            return codes, entries(server)
        finally:
            wire.disconnect()

    codes, held = await asyncio.to_thread(subscribe_many)
    assert limit == 32
    assert codes == [1] * limit + [SUBACK_FAILURE] * (limit * 49)
    assert held == baseline + limit


async def test_a_session_holds_at_most_max_subscriptions(server: BrokerServer) -> None:
    limit = server.settings.broker.max_subscriptions_per_session
    per_packet = server.settings.broker.max_filters_per_subscribe

    def fill_up() -> tuple[list[int], list[int], list[int], list[int]]:
        wire = Wire(server.settings.broker.port, "svc-full", username="svc", password=ACCOUNT_PASSWORD)
        try:
            filters = [f"devices/full/{n}" for n in range(limit)]
            granted = [
                c for i in range(0, limit, per_packet) for c in wire.subscribe(filters[i : i + per_packet])
            ]
            over = wire.subscribe(["devices/full/one-more"])
            again = wire.subscribe([filters[0]], qos=0)  # held already: its QoS is replaced
            wire.unsubscribe([filters[1]])
            after_room = wire.subscribe(["devices/full/one-more"])
            return granted, over, again, after_room
        finally:
            wire.disconnect()

    granted, over, again, after_room = await asyncio.to_thread(fill_up)
    assert limit == 100
    assert granted == [1] * limit
    assert over == [SUBACK_FAILURE]
    assert again == [0]
    assert after_room == [1]


async def test_topics_and_filters_past_the_length_and_level_limits(server: BrokerServer) -> None:
    broker = server.settings.broker
    port = broker.port
    deepest = "devices/" + "/".join(["x"] * (broker.max_topic_levels - 1))
    longest = "devices/" + "y" * (broker.max_topic_length - len("devices/"))
    account = {"username": "svc", "password": ACCOUNT_PASSWORD}

    def probe() -> tuple[list[int], bool, bool, int]:
        wire = Wire(port, "svc-deep", **account)
        codes = wire.subscribe([deepest, deepest + "/z", longest, longest + "y", deepest[:-1] + "#"])
        wire.publish(deepest, b"at the limit")
        # Its own copy comes through the fan-out, which need not precede a PINGRESP: wait for it.
        got_deepest = (deepest, b"at the limit") in wire.wait_published(1)
        # PUBLISH has no refusal in 3.1.1: past the limits the connection is closed.
        wire.sock.sendall(_publish_qos0(deepest + "/z", b"too deep"))
        closed = wire.closed_by_server()
        wire.close()
        will = Wire(port, "svc-will", will=(longest + "y", b"w"), **account)
        will.close()
        return codes, got_deepest, closed, will.code

    codes, got_deepest, closed, will_code = await asyncio.to_thread(probe)
    assert (broker.max_topic_levels, broker.max_topic_length) == (32, 1024)
    assert codes == [1, SUBACK_FAILURE, 1, SUBACK_FAILURE, 1]
    assert got_deepest
    assert closed
    assert will_code == 5


async def test_a_provisioning_session_holds_one_reply_filter_at_a_time(server: BrokerServer) -> None:
    port = server.settings.broker.port
    first, second = (f"provision/reply/{spelling}" for spelling in SPELLINGS[:2])

    def probe() -> list[list[int]]:
        wire = Wire(port, MAC)
        try:
            codes = [wire.subscribe([first]), wire.subscribe([second]), wire.subscribe([first], qos=0)]
            codes.append(wire.subscribe([first, second]))
            wire.unsubscribe([first])
            codes.append(wire.subscribe([second]))
            return codes
        finally:
            wire.disconnect()

    assert await asyncio.to_thread(probe) == [[1], [SUBACK_FAILURE], [0], [1, SUBACK_FAILURE], [1]]


async def test_a_maximal_subscribe_over_many_retained_messages_leaves_others_served(
    server: BrokerServer,
) -> None:
    port = server.settings.broker.port
    stored = 5_000
    for n in range(stored):
        await server.broker.retain_message(None, f"devices/r{n}/state", b"s")
    per_packet = server.settings.broker.max_filters_per_subscribe

    def storm_and_bystander() -> tuple[int, list[int], list[tuple[str, bytes]]]:
        greedy = Wire(port, "svc-greedy", username="svc", password=ACCOUNT_PASSWORD)
        bystander = Wire(port, "svc-bystander", username="svc", password=ACCOUNT_PASSWORD)
        try:
            filters = [f"devices/+/{n}" for n in range(per_packet * 100)]
            body = struct.pack("!H", 7) + b"".join(_text(f) + b"\x01" for f in filters)
            greedy.sock.sendall(bytes([0x82]) + remaining_length(len(body)) + body)
            bystander.ping()  # served while the greedy SUBSCRIBE is being matched
            codes = list(greedy.wait_for(0x90, 7)[2:])
            # One exact filter (a lookup) and one wildcard (a scan of the store) that match.
            matching = greedy.subscribe(["devices/r4999/state", "devices/r42/+"])
            received = sorted(greedy.wait_published(2))
            greedy.ping()
            return sum(c != SUBACK_FAILURE for c in codes), matching, received + greedy.published[2:]
        finally:
            greedy.disconnect()
            bystander.disconnect()

    granted, matching, received = await asyncio.to_thread(storm_and_bystander)
    assert granted == per_packet  # 'devices/+/<n>' matches none of the stored ones
    assert matching == [1, 1]
    assert received == [("devices/r42/state", b"s"), ("devices/r4999/state", b"s")]


def _publish_qos0(topic: str, payload: bytes) -> bytes:
    body = _text(topic) + payload
    return bytes([0x30]) + remaining_length(len(body)) + body


async def test_a_connect_costs_nothing_per_filter_others_hold(
    server: BrokerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # amqtt 0.12.1 walked every filter in the table on every CONNECT (one call each): with a
    # fleet subscribed, a reconnect storm cost the square of the fleet. Counted, not timed.
    port = server.settings.broker.port
    filters = [f"devices/{n}/commands" for n in range(50)]

    def hold_filters() -> Wire:
        holder = Wire(port, "svc-holder", username="svc", password=ACCOUNT_PASSWORD)
        assert holder.subscribe(filters[:25]) == [1] * 25
        assert holder.subscribe(filters[25:]) == [1] * 25
        return holder

    holder = await asyncio.to_thread(hold_filters)
    assert entries(server) == 50
    assert "50 filters" in repr(server.broker.subscriptions)  # amqtt logs it per SUBSCRIBE
    offered: list[str] = []
    original = type(server.broker)._publish_retained_messages_for_subscription

    async def counted(self: object, subscription: tuple[str, int], session: object) -> None:
        offered.append(subscription[0])
        await original(self, subscription, session)  # type: ignore[arg-type]

    monkeypatch.setattr(type(server.broker), "_publish_retained_messages_for_subscription", counted)
    try:

        def connect_twice() -> list[int]:
            codes = []
            for client_id in ("svc-a", "svc-b"):
                wire = Wire(port, client_id, username="svc", password=ACCOUNT_PASSWORD)
                codes.append(wire.code)
                wire.ping()
                wire.disconnect()
            return codes

        assert await asyncio.to_thread(connect_twice) == [0, 0]
        assert offered == []
    finally:
        await asyncio.to_thread(holder.disconnect)
