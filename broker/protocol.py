"""amqtt's per-connection protocol handler, with keep-alive enforced (pinned to amqtt 0.12.1).

amqtt 0.12.1 notices a silent client (no packet within the keep-alive) but then just keeps
reading. MQTT 3.1.1 §3.1.2.10 says the server must disconnect it after 1.5 times the keep-alive,
as if the network had failed (so the will is published).

amqtt 0.12.1 also forgets an outgoing QoS 1/2 message whose acknowledgement does not come (the
connection was lost, or its fixed 5 s wait ran out). For a persistent session we keep it, so that
the next connection of the session gets it again (MQTT 3.1.1 §4.4).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
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
        #: Deliveries to this client in progress at once before further ones are dropped.
        self.max_queued = 1_000
        self._queued = 0
        self.dropped = 0
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

    def handle_read_timeout(self) -> None:
        """amqtt calls this when nothing arrived within the (already 1.5 x) keep-alive."""
        if self._expiry is not None:
            return
        client_id = self.session.client_id if self.session else None
        logger.info("client %r silent past its keep-alive: disconnecting", client_id)
        # Abnormal end of the connection: the broker loop then publishes the will, as for a lost link.
        self._expiry = asyncio.ensure_future(self.handle_connection_closed())
