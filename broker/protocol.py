"""amqtt's per-connection protocol handler, with keep-alive enforced (pinned to amqtt 0.12.1).

amqtt 0.12.1 notices a silent client (no packet within the keep-alive) but then just keeps
reading. MQTT 3.1.1 §3.1.2.10 says the server must disconnect it after 1.5 times the keep-alive,
as if the network had failed (so the will is published).

amqtt 0.12.1 also forgets an outgoing QoS 1/2 message whose acknowledgement does not come (the
connection was lost, or its fixed 5 s wait ran out). For a persistent session we keep it, so that
the next connection of the session gets it again (MQTT 3.1.1 §4.4).

Incoming messages are bounded too (see :meth:`KeepAliveHandler.handle_publish`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage

logger = logging.getLogger(__name__)


def grace(keep_alive: int) -> int:
    """Seconds of silence after which a client with ``keep_alive`` is dropped (1.5 x, rounded up)."""
    return math.ceil(keep_alive * 1.5) if keep_alive > 0 else 0


class KeepAliveHandler(BrokerProtocolHandler):
    """Closes the connection when the client stays silent past its keep-alive grace."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expiry: asyncio.Task[None] | None = None
        #: Deliveries to this client in progress at once before further ones are dropped; also
        #: the bound on incoming messages not yet finished (see handle_publish).
        self.max_queued = 1_000
        self._queued = 0
        self.dropped = 0
        #: Incoming QoS 0 messages dropped, and connections ended, over the same bound.
        self.dropped_incoming = 0
        self.refused_incoming = 0
        self._started = False
        self._early_end: tuple[DisconnectPacket | None] | None = None
        #: Set once the broker has finished with this connection (will sent, session disconnected).
        self.finished = asyncio.Event()

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> OutgoingApplicationMessage:
        """amqtt's delivery, bounded: a subscriber that stops reading cannot exhaust memory."""
        if self._queued >= self.max_queued:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                client_id = self.session.client_id if self.session else None
                logger.warning("client %r is not keeping up: %d messages dropped", client_id, self.dropped)
            return OutgoingApplicationMessage(None, topic, qos, data, retain)
        self._queued += 1
        try:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        finally:
            self._queued -= 1

    async def _handle_message_flow(
        self, app_message: IncomingApplicationMessage | OutgoingApplicationMessage
    ) -> None:
        # amqtt 0.12.1 drops an outgoing message from ``session.inflight_out`` whenever its flow
        # ends, acknowledged or not. Put an unacknowledged one back for a persistent session:
        # amqtt's ``start()`` resends what ``inflight_out`` holds (DUP set, same packet id, or the
        # PUBREL if PUBREC had come) when the session connects again [MQTT-4.4.0-1].
        try:
            await super()._handle_message_flow(app_message)
        except BaseException:
            self._keep_for_redelivery(app_message)
            raise

    def _keep_for_redelivery(self, message: IncomingApplicationMessage | OutgoingApplicationMessage) -> None:
        session = self.session
        if (
            session is None
            or session.clean_session is not False
            or not isinstance(message, OutgoingApplicationMessage)
            or message.packet_id is None
            or message.qos not in (QOS_1, QOS_2)
        ):
            return
        acknowledged = message.puback_packet if message.qos == QOS_1 else message.pubcomp_packet
        if acknowledged is not None or message.packet_id in session.inflight_out:
            return
        if len(session.inflight_out) >= self.max_queued:
            self.dropped += 1
            logger.warning("client %r: too many unacknowledged messages, dropping one", session.client_id)
            return
        session.inflight_out[message.packet_id] = message

    async def start(self) -> None:
        """amqtt's start, then any end of the connection that came while it was starting."""
        await super().start()
        self._started = True
        if self._early_end is not None:
            (packet,) = self._early_end
            self._early_end = None
            await super().handle_disconnect(packet)

    async def stop(self) -> None:
        """End the packet stream, then amqtt's stop (which cancels the reader task).

        On Python 3.11 ``asyncio.wait_for`` loses a cancellation that lands while the read it
        wraps completes, and amqtt's reader loop wraps every read in it: with packets already
        buffered (a flood) the loop read on after stop(), and stop() waited for it forever.
        """
        if self.reader is not None:
            self.reader.feed_eof()
        try:
            await super().stop()
        finally:
            _close_transport(self.writer)

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        """amqtt's, except that a DISCONNECT or lost link during :meth:`start` is not lost.

        amqtt 0.12.1 creates the future the broker waits on for the end of the connection only
        after ``start()`` (which already reads packets, and resends what a persistent session has
        in flight) returns: an end signalled before that was dropped, leaving the session
        "connected" and its tasks waiting forever on a closed socket.
        """
        if not self._started:
            self._early_end = (disconnect,)
            return
        await super().handle_disconnect(disconnect)

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """amqtt's, refusing a client that piles up incoming messages the broker has not finished.

        amqtt 0.12.1 keeps every incoming QoS 2 message until its PUBREL, and queues every
        incoming message for the broker without bound: an (even anonymous) client that never
        sends PUBREL, or floods faster than the broker routes, grows the broker's memory.
        """
        session = self.session
        if session is not None:
            pending = session.delivered_message_queue.qsize() + len(session.inflight_in)
            if pending >= self.max_queued:
                if publish_packet.qos:
                    # MQTT 3.1.1 has no receive maximum to announce; a client this far ahead of
                    # its acknowledgements is broken or hostile: end it like a lost link.
                    logger.warning(
                        "client %r: %d incoming messages unfinished, closing the connection",
                        session.client_id,
                        pending,
                    )
                    self.refused_incoming += 1
                    await self.handle_connection_closed()
                    return
                self.dropped_incoming += 1
                return
        await super().handle_publish(publish_packet)

    def handle_read_timeout(self) -> None:
        """amqtt calls this when nothing arrived within the (already 1.5 x) keep-alive."""
        if self._expiry is not None:
            return
        client_id = self.session.client_id if self.session else None
        logger.info("client %r silent past its keep-alive: disconnecting", client_id)
        # Abnormal end of the connection: the broker loop then publishes the will, as for a lost link.
        self._expiry = asyncio.ensure_future(self.handle_connection_closed())


def _close_transport(writer: Any) -> None:
    # amqtt's StreamWriterAdapter.close() drains before it closes: when the peer went away in the
    # middle of a delivery the drain raises, amqtt logs it at DEBUG, and the transport is never
    # closed (only collected, with a ResourceWarning). Close it for certain.
    stream = getattr(writer, "_writer", None)
    if isinstance(stream, asyncio.StreamWriter) and not stream.is_closing():
        stream.close()
