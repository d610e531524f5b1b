"""The paho-based link of the external-broker worker and bridge, against a broker that ends the
connection over a PUBLISH it refuses, as RabbitMQ 3.10 does (a raw-socket peer, since neither
our broker nor Mosquitto behaves that way)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from provisioning.external.link import ExternalBrokerError, MqttLink, parse_broker_url

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
REFUSED_TOPIC = "devices/x/refused"


class RefusingBroker:
    """Accepts every CONNECT, PUBACKs QoS 1 publishes, and hangs up on one topic."""

    def __init__(self) -> None:
        self.refused_seen = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                header, body = await _read_packet(reader)
                kind = header >> 4
                if kind == 1:  # CONNECT
                    writer.write(CONNACK_ACCEPTED)
                elif kind == 3:  # PUBLISH
                    topic_length = int.from_bytes(body[:2], "big")
                    topic = body[2 : 2 + topic_length].decode()
                    if topic == REFUSED_TOPIC:
                        self.refused_seen += 1
                        return
                    if (header >> 1) & 0x03:
                        packet_id = body[2 + topic_length : 4 + topic_length]
                        writer.write(b"\x40\x02" + packet_id)
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return header, await reader.readexactly(length)


@pytest.fixture
async def refusing_broker() -> AsyncIterator[RefusingBroker]:
    broker = RefusingBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


@pytest.mark.slow
async def test_a_publish_given_up_on_is_not_sent_again_on_every_reconnect(
    refusing_broker: RefusingBroker,
) -> None:
    address = parse_broker_url(f"mqtt://127.0.0.1:{refusing_broker.port}")
    async with MqttLink(address, client_id="worker-1", username="w", password="p", timeout=2.5) as link:
        with pytest.raises(ExternalBrokerError, match="no PUBACK"):
            await link.publish(REFUSED_TOPIC, b"1")
        seen_when_given_up = refusing_broker.refused_seen

        # The link reconnects and serves again; paho would otherwise resend the refused message
        # on every reconnect, and the broker would hang up on every one of them.
        deadline = time.monotonic() + 15
        while True:
            try:
                await link.publish("devices/x/telemetry", b"2")
                break
            except ExternalBrokerError:
                if time.monotonic() > deadline:
                    raise
        connections = refusing_broker.connections
        for n in range(3):
            await link.publish("devices/x/telemetry", str(n).encode())

    assert seen_when_given_up >= 1
    assert refusing_broker.refused_seen <= seen_when_given_up + 1  # at most one already on the wire
    assert refusing_broker.connections == connections  # no more hang-ups once it was dropped
