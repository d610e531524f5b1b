"""What a connection may hold in flight: bounded deliveries both ways, and redelivery.

amqtt 0.12.1 queues deliveries to a client and messages from it without bound, so a subscriber
that stops reading, or a client that floods or never sends PUBREL, grows the broker's memory.
It also forgets an outgoing QoS 1/2 message whose acknowledgement does not come (the connection
was lost, or its fixed 5 s wait ran out): for a persistent session it is kept here, so that the
next connection of the session gets it again (MQTT 3.1.1 §4.4).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage

from auth_plugin.logsafe import shown
from config import BrokerSettings

logger = logging.getLogger(__name__)

_DEFAULT_MAX_QUEUED: int = BrokerSettings.model_fields["max_queued_messages"].default


class BoundedFlow(BrokerProtocolHandler):
    """amqtt's handler with its message flows bounded, and unacknowledged deliveries kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Deliveries to this client in progress at once before further ones are dropped; also
        #: the bound on incoming messages not yet finished (see handle_publish).
        self.max_queued = _DEFAULT_MAX_QUEUED  # the broker sets its own on accept
        self._queued = 0
        self.dropped = 0
        #: Incoming QoS 0 messages dropped, and connections ended, over the same bound.
        self.dropped_incoming = 0
        self.refused_incoming = 0
        #: Messages dropped by reason, for the metrics: the broker's own counter once accepted, so
        #: what a connection dropped outlives it.
        self.drops: Counter[str] = Counter()

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
            self.drops["slow_subscriber"] += 1
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
            self.drops["unacknowledged"] += 1
            logger.warning(
                "client %s: too many unacknowledged messages, dropping one", shown(session.client_id)
            )
            return
        session.inflight_out[message.packet_id] = message

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
                self.drops["incoming"] += 1
                return
        await super().handle_publish(publish_packet)
