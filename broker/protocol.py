"""amqtt's per-connection protocol handler, with keep-alive enforced (pinned to amqtt 0.12.1).

amqtt 0.12.1 notices a silent client (no packet within the keep-alive) but then just keeps
reading. MQTT 3.1.1 §3.1.2.10 says the server must disconnect it after 1.5 times the keep-alive,
as if the network had failed (so the will is published).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage

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

    def handle_read_timeout(self) -> None:
        """amqtt calls this when nothing arrived within the (already 1.5 x) keep-alive."""
        if self._expiry is not None:
            return
        client_id = self.session.client_id if self.session else None
        logger.info("client %r silent past its keep-alive: disconnecting", client_id)
        # Abnormal end of the connection: the broker loop then publishes the will, as for a lost link.
        self._expiry = asyncio.ensure_future(self.handle_connection_closed())
