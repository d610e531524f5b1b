"""Just enough MQTT 3.1.1 on raw non-blocking sockets for the load generators.

The same bytes go to every broker under test, so a figure compares brokers, not client
libraries. Kept free of amqtt, SQLAlchemy and the product packages: load processes import
only this module and :mod:`tests.bench.load`, and start in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
DISCONNECT_PACKET = bytes([0xE0, 0x00])
SUBACK_FAILURE = 0x80
#: CONNACK 3: try again later (what device firmware does).
SERVER_UNAVAILABLE = 3


class MqttError(Exception):
    """The broker answered something a well-behaved broker would not."""


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def remaining_length(length: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def connect_packet(
    client_id: str, username: str | None = None, password: str | None = None, *, keep_alive: int = 60
) -> bytes:
    """A clean-session CONNECT."""
    flags = 0x02
    payload = _text(client_id)
    if username is not None:
        flags |= 0x80
        payload += _text(username)
    if password is not None:
        flags |= 0x40
        payload += _text(password)
    body = _text("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive) + payload
    return bytes([CONNECT << 4]) + remaining_length(len(body)) + body


def publish_packet(
    topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1, retain: bool = False
) -> bytes:
    """A PUBLISH (QoS 0 or 1), retained when ``retain``."""
    body = _text(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([(PUBLISH << 4) | (qos << 1) | int(retain)]) + remaining_length(len(body)) + body


def subscribe_packet(topic_filter: str, *, qos: int = 0, packet_id: int = 1) -> bytes:
    """A SUBSCRIBE to one filter."""
    return subscribe_filters_packet((topic_filter,), qos=qos, packet_id=packet_id)


def subscribe_filters_packet(topic_filters: Sequence[str], *, qos: int = 0, packet_id: int = 1) -> bytes:
    """One SUBSCRIBE carrying every filter of ``topic_filters``, each at ``qos``."""
    body = struct.pack("!H", packet_id) + b"".join(_text(f) + bytes([qos]) for f in topic_filters)
    return bytes([(SUBSCRIBE << 4) | 0x02]) + remaining_length(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    """The PUBACK for a QoS 1 PUBLISH we received."""
    return bytes([PUBACK << 4, 2]) + struct.pack("!H", packet_id)


@dataclass(frozen=True, slots=True)
class Packet:
    """One control packet as read from the stream."""

    kind: int
    flags: int
    body: bytes

    def publish(self) -> tuple[str, int | None, bytes]:
        """``(topic, packet id or None, payload)`` of a PUBLISH."""
        (length,) = struct.unpack_from("!H", self.body)
        topic = self.body[2 : 2 + length].decode()
        offset = 2 + length
        packet_id: int | None = None
        if (self.flags >> 1) & 0x03:
            (packet_id,) = struct.unpack_from("!H", self.body, offset)
            offset += 2
        return topic, packet_id, self.body[offset:]


class PacketReader:
    """Split a byte stream into packets; feed it whatever ``recv`` returned."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Packet]:
        """Every packet completed by ``data``, in order."""
        self._buffer += data
        while True:
            parsed = _parse_header(self._buffer)
            if parsed is None:
                return
            header_length, body_length = parsed
            end = header_length + body_length
            first = self._buffer[0]
            body = bytes(self._buffer[header_length:end])
            del self._buffer[:end]
            yield Packet(first >> 4, first & 0x0F, body)


def _parse_header(buffer: bytearray) -> tuple[int, int] | None:
    """``(header length, body length)`` once the buffer holds the whole packet, else None."""
    multiplier, value = 1, 0
    for index in range(1, min(len(buffer), 5)):
        byte = buffer[index]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            header = index + 1
            return (header, value) if len(buffer) >= header + value else None
        multiplier *= 128
    if len(buffer) >= 5:
        raise MqttError("malformed remaining length")
    return None


class Connection:
    """One MQTT connection on a non-blocking socket driven by the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = PacketReader()
        self._pending: list[Packet] = []
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, host: str, port: int, *, source: str | None = None) -> Connection:
        """A TCP connection to the broker (Nagle off, as every MQTT client does).

        ``source``: the local address to connect from (another loopback address, 127.0.0.2, is
        another client host to the broker's per-address limits).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(0.0)  # non-blocking, as the loop's sock_* calls require
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if source is not None:
                sock.bind((source, 0))
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> None:
        """Write all of ``data``."""
        await self._loop.sock_sendall(self.sock, data)

    async def packet(self) -> Packet:
        """The next packet; :class:`ConnectionError` when the broker closes the connection."""
        while not self._pending:
            data = await self._loop.sock_recv(self.sock, 65536)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._pending.extend(self.reader.feed(data))
        return self._pending.pop(0)

    async def packets(self) -> list[Packet]:
        """Every packet available after one read (at least one)."""
        if not self._pending:
            await self.packet_ready()
        found, self._pending = self._pending, []
        return found

    async def packet_ready(self) -> None:
        """Wait until at least one packet is buffered."""
        while not self._pending:
            data = await self._loop.sock_recv(self.sock, 262144)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._pending.extend(self.reader.feed(data))

    async def expect(self, kind: int) -> Packet:
        """The next packet of type ``kind``; PUBLISHes in between are acknowledged and dropped."""
        while True:
            packet = await self.packet()
            if packet.kind == kind:
                return packet
            if packet.kind == PUBLISH:
                _topic, packet_id, _payload = packet.publish()
                if packet_id is not None:
                    await self.send(puback_packet(packet_id))

    async def login(
        self, client_id: str, username: str | None, password: str | None, *, keep_alive: int = 60
    ) -> int:
        """Send CONNECT and return the CONNACK return code."""
        await self.send(connect_packet(client_id, username, password, keep_alive=keep_alive))
        connack = await self.expect(CONNACK)
        if len(connack.body) != 2:
            raise MqttError(f"malformed CONNACK {connack.body!r}")
        return connack.body[1]

    async def subscribe(self, topic_filter: str, *, qos: int = 0) -> None:
        """SUBSCRIBE and wait for the SUBACK; :class:`MqttError` when refused."""
        await self.send(subscribe_packet(topic_filter, qos=qos))
        suback = await self.expect(SUBACK)
        if suback.body[-1] == SUBACK_FAILURE:
            raise MqttError(f"subscription to {topic_filter} refused")

    async def disconnect(self) -> None:
        """Send DISCONNECT (best effort) and close the socket."""
        try:
            await self.send(DISCONNECT_PACKET)
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket without DISCONNECT."""
        self.sock.close()
