"""Thin amqtt adapter: answer ``provision/request`` messages through :class:`ProvisioningService`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from amqtt.plugins.base import BasePlugin

from provisioning.contract import REQUEST_TOPIC, identity_from_client_id
from provisioning.ports import SessionControl
from provisioning.service import Outcome, ProvisioningService

logger = logging.getLogger(__name__)


class ProvisioningPlugin(BasePlugin[Any]):
    """Handles requests in the broadcast hook: it fires only for publishes the ACL let through."""

    #: The only topic whose broadcasts this plugin acts on: the broker fires the event for no other.
    broadcast_topics: ClassVar[frozenset[str]] = frozenset({REQUEST_TOPIC})

    @dataclass
    class Config:
        """The services doing the work (passed in by ``broker.embedded.assembly``)."""

        service: Any = None
        sessions: Any = None

    async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
        """amqtt hook, run as its own task per message."""
        if message is None or message.topic != REQUEST_TOPIC:
            return
        service: ProvisioningService = self.config.service
        sessions: SessionControl = self.config.sessions
        identity = identity_from_client_id(client_id)
        if identity is None:  # the ACL lets only provisioning sessions publish here
            logger.warning("dropped a provisioning request from non-provisioning client %r", client_id)
            return
        session = self.context.get_session(client_id)
        address = session.remote_address if session is not None else None
        try:
            outcome = await service.handle(identity, bytes(message.data or b""), address)
            delivered = await sessions.deliver(client_id, outcome.topic, outcome.reply.to_payload())
            if not delivered:
                logger.warning(
                    "provisioning reply for client %r not delivered: the session is gone (it may ask again)",
                    client_id,
                )
            await self._announce(sessions, outcome)
        except Exception:
            # amqtt logs hook failures only at DEBUG: say it loudly here.
            logger.exception("provisioning request from client %r failed", client_id)

    @staticmethod
    async def _announce(sessions: SessionControl, outcome: Outcome) -> None:
        event = outcome.event()
        if event is not None:
            await sessions.announce(*event)
