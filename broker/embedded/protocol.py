"""amqtt's per-connection protocol handler, with keep-alive enforced (pinned to amqtt 0.12.1).

amqtt 0.12.1 notices a silent client (no packet within the keep-alive) but then just keeps
reading. MQTT 3.1.1 §3.1.2.10 says the server must disconnect it after 1.5 times the keep-alive,
as if the network had failed (so the will is published).

amqtt 0.12.1 also forgets an outgoing QoS 1/2 message whose acknowledgement does not come (the
connection was lost, or its fixed 5 s wait ran out). For a persistent session we keep it, so that
the next connection of the session gets it again (MQTT 3.1.1 §4.4).

Incoming messages are bounded too (see :meth:`KeepAliveHandler.handle_publish`), and a CONNECT
makes a :class:`broker.embedded.session.BrokerSession` (see :meth:`KeepAliveHandler.init_from_connect`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.errors import MQTTError
from amqtt.events import MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage
from amqtt.utils import format_client_message

from auth_plugin.logsafe import BurstLog, shown
from broker.embedded.session import BrokerSession

logger = logging.getLogger(__name__)
_silent = BurstLog(logger, "clients silent past their keep-alive disconnected")

#: The protocol level of MQTT 3.1.1, the only one amqtt 0.12.1 speaks.
_MQTT_311 = 4


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

    @classmethod
    async def init_from_connect(
        cls, reader: ReaderAdapter, writer: WriterAdapter, plugins_manager: Any, loop: Any = None
    ) -> tuple[KeepAliveHandler, BrokerSession]:
        """amqtt 0.12.1's, the same checks and answers, making a :class:`BrokerSession`.

        amqtt's version names its session class inside the function; this copy differs only
        there (and reads the peer before the checks that need it).
        """
        connect = await ConnectPacket.from_stream(reader)
        await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
        if connect.variable_header is None or connect.payload is None:
            raise MQTTError("CONNECT packet: variable header or payload not initialized.")
        if connect.payload.client_id is None:
            raise MQTTError("[[MQTT-3.1.3-3]] : Client identifier must be present")
        if connect.variable_header.will_flag and (
            connect.payload.will_topic is None or connect.payload.will_message is None
        ):
            raise MQTTError("Will flag set, but will topic/message not present in payload")
        if connect.variable_header.reserved_flag:
            raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
        if connect.proto_name != "MQTT":
            raise MQTTError(f'[MQTT-3.1.2-1] Incorrect protocol name: "{connect.proto_name}"')
        remote_address, remote_port = writer.get_peer_info() or (None, None)
        client = format_client_message(address=remote_address, port=remote_port)
        refusal: tuple[int, str | None] | None = None
        if connect.proto_level != _MQTT_311:
            refusal = UNACCEPTABLE_PROTOCOL_VERSION, f"Invalid protocol from {client}: {connect.proto_level}"
        elif not connect.username_flag and connect.password_flag:
            refusal = BAD_USERNAME_PASSWORD, None  # [MQTT-3.1.2-22]
        elif connect.username_flag and connect.username is None:
            refusal = BAD_USERNAME_PASSWORD, f"Invalid username from {client}"
        elif connect.password_flag and connect.password is None:
            refusal = BAD_USERNAME_PASSWORD, f"Invalid password from {client}"
        elif connect.clean_session_flag is False and connect.payload.client_id_is_random:
            refusal = IDENTIFIER_REJECTED, f"[MQTT-3.1.3-8] [MQTT-3.1.3-9] {client}: No client Id provided"
        if refusal is not None:
            code, message = refusal
            connack = ConnackPacket.build(0, code)  # [MQTT-3.2.2-4] session present 0
            await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
            await connack.to_stream(writer)
            await writer.close()
            raise MQTTError(message)
        session = BrokerSession()
        session.client_id = connect.client_id
        session.clean_session = connect.clean_session_flag
        session.will_flag = connect.will_flag
        session.will_retain = connect.will_retain_flag
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password
        session.remote_address = remote_address
        session.remote_port = remote_port
        session.ssl_object = writer.get_ssl_info()
        session.keep_alive = max(connect.keep_alive, 0)
        return cls(plugins_manager, loop=loop), session

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
                logger.warning(
                    "client %s is not keeping up: %d messages dropped", shown(client_id), self.dropped
                )
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
            logger.warning(
                "client %s: too many unacknowledged messages, dropping one", shown(session.client_id)
            )
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
            close_transport(self.writer)

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
                        "client %s: %d incoming messages unfinished, closing the connection",
                        shown(session.client_id),
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
        _silent.refused("client %s silent past its keep-alive: disconnecting", shown(client_id))
        # Abnormal end of the connection: the broker loop then publishes the will, as for a lost link.
        self._expiry = asyncio.ensure_future(self.handle_connection_closed())


def close_transport(writer: WriterAdapter | None) -> None:
    """Close the socket under amqtt's writer adapter, whatever state the adapter is in.

    amqtt's StreamWriterAdapter.close() drains before it closes: when the peer went away in the
    middle of a delivery the drain raises, amqtt logs it at DEBUG, and the transport is never
    closed (only collected, with a ResourceWarning). Websocket writers have no such transport.
    """
    if not isinstance(writer, StreamWriterAdapter):
        return
    # No default: if amqtt renames it, this fails loudly instead of leaking every socket.
    stream = writer._writer
    if not isinstance(stream, asyncio.StreamWriter):
        raise TypeError(f"amqtt's StreamWriterAdapter._writer is a {type(stream).__name__}")
    if not stream.is_closing():
        stream.close()
