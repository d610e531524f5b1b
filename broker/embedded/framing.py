"""Whole, checked MQTT 3.1.1 packets for amqtt's parser (pinned to amqtt 0.12.1).

amqtt 0.12.1 parses straight off the socket, field by field, without holding a packet to its
remaining length: a CONNECT whose fields overrun its length eats the next packet, a malformed
packet is "discarded" and the stream read on out of step, strings that are not UTF-8 become
``"b'...'"`` topics, a packet may be up to 256 MB and take forever to arrive, and a SUBSCRIBE or
PUBLISH before CONNECT is read as a CONNECT. :class:`FramingReader` sits between the socket and
amqtt: it reads one whole packet at a time (within ``max_packet_bytes`` and ``frame_timeout``),
checks it against the 3.1.1 rules below, and ends the stream at the first packet that breaks
one, so amqtt closes the connection the way it does for a lost link (the will is published, as
§3.1.2.5 asks for a protocol error).
"""

from __future__ import annotations

import asyncio
import logging
import struct

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter

from auth_plugin.logsafe import BurstLog

logger = logging.getLogger(__name__)
_malformed = BurstLog(logger, "connections closed for a malformed packet")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
_SERVER_TO_CLIENT = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}
# Fixed-header flags every packet type must carry [MQTT-2.2.2-1], [MQTT-2.2.2-2].
_FLAGS_TWO = {PUBREL, SUBSCRIBE, UNSUBSCRIBE}
# Exact remaining lengths of the packets that have one.
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}


# How a 3.1.1 CONNECT body starts: protocol name "MQTT", level 4.
_MQTT_311 = b"\x00\x04MQTT\x04"


class Malformed(Exception):  # noqa: N818 - a verdict on a packet, never raised past this module
    """The packet breaks an MQTT 3.1.1 rule; ``str(exc)`` says which."""


class _Body:
    """Cursor over one packet's variable header and payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise Malformed("a field runs past the packet's remaining length")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def uint16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.uint16())

    def text(self, what: str) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"{what} is not valid UTF-8 [MQTT-1.5.3-1]") from None
        if "\x00" in value:
            raise Malformed(f"{what} contains U+0000 [MQTT-1.5.3-2]")
        return value

    def packet_id(self) -> int:
        packet_id = self.uint16()
        if packet_id == 0:
            raise Malformed("packet identifier 0 [MQTT-2.3.1-1]")
        return packet_id

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def finish(self) -> None:
        if self.left:
            raise Malformed(f"{self.left} bytes past the packet's fields")


def check_packet(first: int, body: bytes, *, connected: bool) -> None:
    """Raise :class:`Malformed` when the packet (first header byte and body) breaks a 3.1.1 rule.

    ``connected``: whether a CONNECT has already been read on this connection.
    """
    kind, flags = first >> 4, first & 0x0F
    if not connected and kind != CONNECT:
        raise Malformed(f"packet type {kind} before CONNECT [MQTT-3.1.0-1]")
    if connected and kind == CONNECT:
        raise Malformed("a second CONNECT [MQTT-3.1.0-2]")
    if kind in _SERVER_TO_CLIENT:
        raise Malformed(f"{_SERVER_TO_CLIENT[kind]} sent to the server")
    if kind in {0, 15}:
        raise Malformed(f"reserved packet type {kind}")
    if kind == PUBLISH:
        _check_publish(flags, _Body(body))
        return
    expected_flags = 0x02 if kind in _FLAGS_TWO else 0
    if flags != expected_flags:
        raise Malformed(f"packet type {kind} with flags {flags:#x} [MQTT-2.2.2-2]")
    if kind in _FIXED_LENGTH and len(body) != _FIXED_LENGTH[kind]:
        raise Malformed(f"packet type {kind} with remaining length {len(body)}")
    if kind == CONNECT:
        _check_connect(_Body(body))
    elif kind == SUBSCRIBE:
        _check_subscribe(_Body(body))
    elif kind == UNSUBSCRIBE:
        _check_unsubscribe(_Body(body))


def _check_publish(flags: int, body: _Body) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
    topic = body.text("topic name")
    if not topic:
        raise Malformed("empty topic name [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise Malformed("wildcard in a topic name [MQTT-3.3.2-2]")
    if qos:
        body.packet_id()


def _check_connect(body: _Body) -> None:
    name = body.text("protocol name")
    level = body.byte()
    if name != "MQTT" or level != 4:
        # Another protocol or version: amqtt answers CONNACK 1 or closes; its fields differ.
        return
    flags = body.byte()
    if flags & 0x01:
        raise Malformed("CONNECT reserved flag set [MQTT-3.1.2-3]")
    will, will_qos, will_retain = flags & 0x04, (flags >> 3) & 0x03, flags & 0x20
    if will_qos == 3:
        raise Malformed("will QoS 3 [MQTT-3.1.2-14]")
    if not will and (will_qos or will_retain):
        raise Malformed("will QoS or retain without a will [MQTT-3.1.2-13], [MQTT-3.1.2-15]")
    body.uint16()  # keep-alive
    body.text("client identifier")
    if will:
        topic = body.text("will topic")
        if not topic or "+" in topic or "#" in topic:
            raise Malformed("will topic is not a topic name [MQTT-3.1.2-9]")
        body.binary()
    if flags & 0x80:
        body.text("user name")
    if flags & 0x40:
        body.binary()  # passwords are binary data in 3.1.1: any bytes
    body.finish()


def _check_subscribe(body: _Body) -> None:
    body.packet_id()
    if not body.left:
        raise Malformed("SUBSCRIBE without a topic filter [MQTT-3.8.3-3]")
    while body.left:
        if not body.text("topic filter"):
            raise Malformed("empty topic filter [MQTT-4.7.3-1]")
        options = body.byte()
        if options > 2:
            raise Malformed(f"requested QoS byte {options:#x} [MQTT-3-8.3-4]")


def _check_unsubscribe(body: _Body) -> None:
    body.packet_id()
    if not body.left:
        raise Malformed("UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]")
    while body.left:
        if not body.text("topic filter"):
            raise Malformed("empty topic filter [MQTT-4.7.3-1]")


class FramingReader(ReaderAdapter):  # type: ignore[misc] # amqtt ships no type information
    """A reader that hands amqtt only whole packets that passed :func:`check_packet`.

    Waiting for a packet to *start* is bounded by whoever reads (amqtt's keep-alive, our CONNECT
    timeout); once its first byte is in, the rest must arrive within ``frame_timeout``.

    It cuts packets out of what it has read: over TCP and TLS whatever has arrived on the
    socket's stream, so a packet already received costs no further waits or timers; over
    websockets (amqtt's reader has no such stream) the header byte by byte, then the rest.
    """

    def __init__(
        self, inner: ReaderAdapter, *, peer: str, max_packet_bytes: int, frame_timeout: float
    ) -> None:
        self._inner = inner
        self._peer = peer
        self._max_packet_bytes = max_packet_bytes
        self._frame_timeout = frame_timeout
        # Whole checked packets not yet read by amqtt; it reads field by field, so keep an
        # offset rather than cutting the front off a large buffer for every field.
        self._buffer = b""
        self._pos = 0
        # amqtt's StreamReaderAdapter keeps the asyncio stream as ``_reader`` (amqtt 0.12.1): read
        # without a default, so that a rename fails every connection rather than slowing them.
        self._stream: asyncio.StreamReader | None = None
        if isinstance(inner, StreamReaderAdapter):
            stream = inner._reader  # the one amqtt internal this reader needs
            if not isinstance(stream, asyncio.StreamReader):
                raise TypeError(f"amqtt's StreamReaderAdapter._reader is a {type(stream).__name__}")
            self._stream = stream
        #: Bytes read from the stream and not yet cut into packets.
        self._raw = bytearray()
        self._connected = False
        self._ended = False
        #: Why the stream was ended (None while every packet was well formed).
        self.violation: str | None = None

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of whole checked packets; fewer only when the stream has ended."""
        while (n < 0 or self._available() < n) and not self._ended:
            await self._next_packet()
        if n < 0 or self._available() < n:
            # amqtt reads exact counts: a short read is its end-of-stream (NoDataError).
            n = self._available()
        data = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return data

    def _available(self) -> int:
        return len(self._buffer) - self._pos

    def feed_eof(self) -> None:
        """End the stream here: amqtt gets no further packet, whatever has arrived or arrives.

        Not passed on to the socket's stream: asyncio asserts when data arrives after its
        ``feed_eof`` (the transport then fails, and amqtt's close raises that). A read still
        waiting on the socket ends when amqtt's stop cancels its reader task.
        """
        self._ended = True

    async def _next_packet(self) -> None:
        packet = await self._cut_packet()
        if packet is None or self._ended:  # ended while the packet was arriving: drop it
            return
        first, header, body = packet
        try:
            check_packet(first[0], body, connected=self._connected)
        except Malformed as exc:
            self._reject(str(exc))
            return
        self._connected = True
        self._buffer = self._buffer[self._pos :] + first + header + body
        if first[0] >> 4 == CONNECT and not body.startswith(_MQTT_311):
            # Another protocol or version: amqtt refuses it (CONNACK 1) once it has read the
            # fields it expects, which for MQTT 5 run past this packet. Nothing follows it.
            self._ended = True
        self._pos = 0

    async def _cut_packet(self) -> tuple[bytes, bytes, bytes] | None:
        """The next packet as (first byte, remaining-length bytes, body), from what was read."""
        deadline: float | None = None
        while (need := self._needed()) > 0:
            if self._raw and deadline is None:
                deadline = asyncio.get_running_loop().time() + self._frame_timeout
            try:
                if deadline is None:
                    chunk = await self._more(need)
                else:
                    async with asyncio.timeout_at(deadline):
                        chunk = await self._more(need)
            except TimeoutError:
                self._reject(f"a packet not complete within {self._frame_timeout}s")
                return None
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                chunk = b""
            except asyncio.CancelledError:
                if self._stream is None and self._raw:
                    # Cancelled mid-packet (a keep-alive expiry) on a reader that may have
                    # consumed part of a message: what follows would be out of step.
                    self._ended = True
                raise
            if not chunk:
                self._ended = True
                return None
            self._raw += chunk
        if need < 0:
            return None
        raw = self._raw
        header_end, length = _remaining_length_in(raw)
        packet = bytes(raw[: header_end + length])
        del raw[: header_end + length]
        return packet[:1], packet[1:header_end], packet[header_end:]

    def _needed(self) -> int:
        """Bytes still missing from the packet at the front of what was read: 0 when it is whole,
        -1 once it is rejected (a remaining length that is malformed or over the limit)."""
        raw = self._raw
        if not raw:
            return 1
        header_end, length = _remaining_length_in(raw)
        if header_end < 0:
            self._reject("remaining length longer than four bytes")
            return -1
        if not header_end:
            return 1
        if length > self._max_packet_bytes:
            self._reject(f"remaining length {length} over the limit of {self._max_packet_bytes} bytes")
            return -1
        return max(header_end + length - len(raw), 0)

    async def _more(self, need: int) -> bytes:
        """What has arrived on the socket's stream (up to :data:`_READ_SIZE`), or, from a reader
        without one (websockets), the ``need`` bytes that complete the header or the packet."""
        if self._stream is not None:
            return await self._stream.read(_READ_SIZE)
        data: bytes = await self._inner.read(need)
        return data

    def _reject(self, reason: str) -> None:
        self._ended = True
        self.violation = reason
        _malformed.refused("closing %s: malformed packet: %s", self._peer, reason)


#: How much one read from the socket's stream takes at most (what has arrived, up to this).
_READ_SIZE = 65_536


def _remaining_length_in(raw: bytearray) -> tuple[int, int]:
    """Where the packet in ``raw`` (first byte at 0) starts its body, and the body's length.

    ``(0, 0)`` while the remaining-length bytes are incomplete; ``(-1, 0)`` when they run past
    four bytes.
    """
    value, multiplier = 0, 1
    for index in range(1, min(len(raw), 5)):
        byte = raw[index]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return index + 1, value
        multiplier *= 128
    return (-1, 0) if len(raw) >= 5 else (0, 0)
