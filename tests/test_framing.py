"""broker.embedded.framing's reader over a real asyncio stream: packets cut from what has arrived.

End-to-end behaviour (malformed packets on real sockets) is in test_hostile_mqtt.py; these pin
the cutting itself: several packets in one read, a packet split over many, the limits.
"""

from __future__ import annotations

import asyncio

import pytest
from amqtt.adapters import BufferReader, StreamReaderAdapter

from broker.embedded.framing import FramingReader
from tests.bench.mqtt import connect_packet, publish_packet, remaining_length, subscribe_packet

FRAME_TIMEOUT = 0.2


def framing(stream: asyncio.StreamReader, *, max_packet_bytes: int = 1_000_000) -> FramingReader:
    return FramingReader(
        StreamReaderAdapter(stream),
        peer="test",
        max_packet_bytes=max_packet_bytes,
        frame_timeout=FRAME_TIMEOUT,
    )


async def test_packets_that_arrive_together_are_handed_over_one_by_one() -> None:
    stream = asyncio.StreamReader()
    packets = [connect_packet("c1"), subscribe_packet("a/#"), publish_packet("a/b", b"x" * 300)]
    stream.feed_data(b"".join(packets))
    reader = framing(stream)
    for packet in packets:
        assert await reader.read(len(packet)) == packet
    assert reader.violation is None


async def test_a_packet_that_arrives_byte_by_byte_is_handed_over_whole() -> None:
    stream = asyncio.StreamReader()
    packet = connect_packet("c1", "user", "secret")
    reader = framing(stream)
    reading = asyncio.ensure_future(reader.read(len(packet)))
    for byte in packet:
        assert not reading.done()
        stream.feed_data(bytes([byte]))
        await asyncio.sleep(0)  # let the reader take the byte: a scheduling point, not a wait
    assert await asyncio.wait_for(reading, 5.0) == packet


async def test_a_packet_not_finished_within_the_frame_timeout_ends_the_stream() -> None:
    stream = asyncio.StreamReader()
    packet = connect_packet("c1")
    stream.feed_data(packet[:5])
    reader = framing(stream)
    assert await asyncio.wait_for(reader.read(len(packet)), 5.0) == b""
    assert reader.violation == f"a packet not complete within {FRAME_TIMEOUT}s"


async def test_waiting_for_a_packet_to_start_is_not_bounded_by_the_frame_timeout() -> None:
    stream = asyncio.StreamReader()
    reader = framing(stream)
    reading = asyncio.ensure_future(reader.read(2))
    done, _ = await asyncio.wait({reading}, timeout=FRAME_TIMEOUT * 3)
    assert not done  # the keep-alive or the CONNECT timeout bound this wait, not the frame
    packet = connect_packet("c1")
    stream.feed_data(packet)
    assert await asyncio.wait_for(reading, 5.0) == packet[:2]


async def test_an_oversized_packet_is_refused_before_its_body_arrives() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(bytes([0x10]) + remaining_length(2_000))  # a CONNECT announcing 2,000 bytes
    reader = framing(stream, max_packet_bytes=1_000)
    assert await asyncio.wait_for(reader.read(2), 5.0) == b""
    assert reader.violation == "remaining length 2000 over the limit of 1000 bytes"


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
async def test_a_remaining_length_over_four_bytes_is_refused(split: bool) -> None:
    stream = asyncio.StreamReader()
    header = bytes([0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
    stream.feed_data(header[:3] if split else header)
    reader = framing(stream)
    reading = asyncio.ensure_future(reader.read(2))
    if split:
        await asyncio.sleep(0)
        stream.feed_data(header[3:])
    assert await asyncio.wait_for(reading, 5.0) == b""
    assert reader.violation == "remaining length longer than four bytes"


async def test_the_end_of_the_stream_mid_packet_is_a_short_read() -> None:
    stream = asyncio.StreamReader()
    packet = connect_packet("c1")
    stream.feed_data(packet[:-1])
    stream.feed_eof()
    reader = framing(stream)
    assert await asyncio.wait_for(reader.read(len(packet)), 5.0) == b""
    assert reader.violation is None  # a lost link, not a malformed packet


async def test_after_feed_eof_nothing_more_is_handed_over_and_the_socket_may_still_send() -> None:
    stream = asyncio.StreamReader()
    first, second = connect_packet("c1"), subscribe_packet("a/#")
    stream.feed_data(first + second)
    reader = framing(stream)
    assert await reader.read(len(first)) == first
    reader.feed_eof()  # what the handler's stop() does
    # asyncio asserts on data after its own feed_eof; ours leaves the socket's stream open.
    stream.feed_data(publish_packet("a/b", b"late"))
    assert await asyncio.wait_for(reader.read(len(second)), 5.0) == b""


async def test_a_reader_without_a_socket_stream_gets_the_same_packets_and_limits() -> None:
    # amqtt's websocket reader has no asyncio stream: the header is read byte by byte, then the
    # rest of the packet exactly. BufferReader is amqtt's own reader of that kind over bytes.
    packets = [connect_packet("c1"), subscribe_packet("a/#"), publish_packet("a/b", b"x" * 300)]
    reader = FramingReader(
        BufferReader(b"".join(packets)), peer="test", max_packet_bytes=1_000, frame_timeout=FRAME_TIMEOUT
    )
    for packet in packets:
        assert await reader.read(len(packet)) == packet
    assert await reader.read(2) == b""  # the end of the bytes
    assert reader.violation is None

    oversized = FramingReader(
        BufferReader(connect_packet("c1") + publish_packet("a/b", b"x" * 2_000)),
        peer="test",
        max_packet_bytes=1_000,
        frame_timeout=FRAME_TIMEOUT,
    )
    assert await oversized.read(len(connect_packet("c1"))) == connect_packet("c1")
    assert await oversized.read(2) == b""
    assert oversized.violation == "remaining length 2005 over the limit of 1000 bytes"
