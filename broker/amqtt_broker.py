"""Our narrow extensions of amqtt's :class:`~amqtt.broker.Broker` (pinned to amqtt 0.12.1).

- authenticate a CONNECT *before* it may touch the session table (amqtt takes over, deletes or
  rewrites a live session of the same client id first, whatever the credentials);
- close a connection that sends no CONNECT within ``broker.connect_timeout``;
- never keep a refused session, and answer a refusal with the right CONNACK code (4 or 5);
- enforce keep-alive (see :mod:`broker.protocol`);
- deliver a message to one session directly (provisioning replies never pass subscriptions);
- disconnect one session without its will (revocation, re-provisioning);
- never retain what a provisioning session publishes or anything under ``provision/``;
- send retained messages only where the topic ACL allows RECEIVE (amqtt skips that check).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from auth_plugin.principals import (
    SERVER_UNAVAILABLE,
    Principal,
    ProvisioningPrincipal,
    principal_of,
    refusal_code,
)
from broker.protocol import KeepAliveHandler, grace

logger = logging.getLogger(__name__)

AMQTT_VERSION = "0.12.1"
#: Reply publish waits at most this long for the device's PUBACK.
DELIVERY_TIMEOUT = 10.0
_PROVISION_ROOT = "provision/"
_PREAUTHENTICATED = "mqttprov.preauthenticated"
#: Message of the exception that ends a refused or timed-out connection (amqtt logs it).
REFUSED_MARKER = "mqttprov: connection refused"


@dataclass(frozen=True)
class ConnectionLimits:
    """``[broker]`` limits the broker enforces itself."""

    connect_timeout: float = 10.0
    max_connections: int = 100_000
    max_connections_per_address: int = 2_000
    max_queued_messages: int = 1_000


class MqttprovBroker(Broker):
    """amqtt's broker with the session controls and retained-message rules mqttprov relies on."""

    def __init__(self, config: dict[str, Any], *, limits: ConnectionLimits | None = None) -> None:
        super().__init__(config)
        self.limits = limits or ConnectionLimits()
        self.connect_timeout = self.limits.connect_timeout
        self._open = 0
        self._open_by_address: Counter[str] = Counter()
        self.refused_over_limit = 0

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        # Count every open connection by source address for the limits checked at CONNECT.
        peer = writer.get_peer_info()
        address = str(peer[0]) if peer else "?"
        self._open += 1
        self._open_by_address[address] += 1
        try:
            await super()._client_connected(listener_name, reader, writer)
        finally:
            self._open -= 1
            self._open_by_address[address] -= 1
            if self._open_by_address[address] <= 0:
                del self._open_by_address[address]

    def _over_limit(self, address: str) -> bool:
        return (
            self._open > self.limits.max_connections
            or self._open_by_address[address] > self.limits.max_connections_per_address
        )

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # Replaces amqtt 0.12.1's version: same session-table rules, but only after the CONNECT
        # has been authenticated, and only for as long as the client takes to send it.
        peer = f"{remote_address}:{remote_port}"
        try:
            handler, fresh = await asyncio.wait_for(
                KeepAliveHandler.init_from_connect(reader, writer, self.plugins_manager),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            logger.info("closing %s: no CONNECT within %ss", peer, self.connect_timeout)
            await writer.close()
            raise AMQTTError(REFUSED_MARKER) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        if fresh.clean_session and not fresh.client_id:
            fresh.client_id = gen_client_id()
        if self._over_limit(remote_address):
            # Before any bcrypt: a flood of connections must not buy itself password checks.
            self.refused_over_limit += 1
            logger.debug("refusing %s: connection limit reached", peer)
            await self._refuse(writer, SERVER_UNAVAILABLE)
        authenticated = await super()._authenticate(fresh, None)
        fresh.password = None  # checked; amqtt would keep the plaintext for the session's lifetime
        if not authenticated:
            await self._refuse(writer, refusal_code(fresh))
        handler.max_queued = self.limits.max_queued_messages
        session = await self._adopt(fresh)
        session.keep_alive = grace(fresh.keep_alive)
        session.attributes[_PREAUTHENTICATED] = True
        return handler, session

    @staticmethod
    async def _refuse(writer: WriterAdapter, code: int) -> NoReturn:
        await ConnackPacket.build(0, code).to_stream(writer)
        await writer.close()
        raise MQTTError(REFUSED_MARKER)

    async def _adopt(self, fresh: Session) -> Session:
        """amqtt's session-table rules for an authenticated CONNECT (MQTT 3.1.1 §3.1.2.4)."""
        client_id = fresh.client_id or ""
        existing = self._sessions.get(client_id)
        if fresh.clean_session:
            if existing is not None:
                await self._end_live(existing)
                await self._delete_session(client_id)
            fresh.parent = 0
            return fresh
        if existing is None:
            fresh.parent = 0
            return fresh
        session = existing[0]
        for name in (
            "will_flag",
            "will_message",
            "will_topic",
            "will_qos",
            "will_retain",
            "username",
        ):
            setattr(session, name, getattr(fresh, name))
        session.attributes.update(fresh.attributes)
        session.parent = 1
        return session

    @staticmethod
    async def _end_live(entry: tuple[Session, BrokerProtocolHandler]) -> None:
        # amqtt would orphan the old socket here (its session deleted, its connection left open).
        session, handler = entry
        if session.transitions.state == "connected":
            await handler.handle_connection_closed()

    async def _authenticate(self, session: Session, _: Any) -> bool:
        # Already decided in _initialize_client_session; amqtt asks again on the adopted session.
        return session.attributes.pop(_PREAUTHENTICATED, False) is True

    async def deliver(self, client_id: str, topic: str, payload: bytes) -> bool:
        """Publish to the one connected session ``client_id`` (QoS 1), bypassing subscriptions."""
        session, handler = self._sessions.get(client_id, (None, None))
        if session is None or handler is None or session.transitions.state != "connected":
            return False
        try:
            await handler.mqtt_publish(topic, payload, 1, retain=False, ack_timeout=DELIVERY_TIMEOUT)
        except TimeoutError:
            logger.warning("client %r did not acknowledge a direct delivery in time", client_id)
            return False
        except Exception:
            logger.warning("could not deliver to client %r", client_id, exc_info=True)
            return False
        return True

    async def kick(self, client_id: str, reason: str) -> bool:
        """End the live session of ``client_id`` without publishing its will."""
        session, handler = self._sessions.get(client_id, (None, None))
        if session is None or handler is None or session.transitions.state != "connected":
            return False
        session.will_flag = False
        session.will_message = None
        logger.info("disconnecting client %r: %s", client_id, reason)
        await handler.handle_connection_closed()
        return True

    async def announce(self, topic: str, payload: bytes) -> None:
        """Broadcast a broker-originated message (subscribers' RECEIVE checks still apply)."""
        await self.internal_message_broadcast(topic, payload, 0)

    def live_principals(self) -> Iterator[tuple[str, Principal]]:
        """``(client_id, principal)`` of every connected, authenticated session."""
        for client_id, (session, _handler) in list(self._sessions.items()):
            principal = principal_of(session)
            if principal is not None and session.transitions.state == "connected":
                yield client_id, principal

    async def close_listeners(self) -> None:
        """Close the listeners a failed :meth:`start` opened before the one that failed.

        amqtt 0.12.1 leaves them bound, and its ``shutdown`` refuses to run from the failed state.
        """
        for server in self._servers.values():
            await server.close_instance()

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Refuse to retain provisioning traffic; otherwise as amqtt does."""
        if topic_name is not None and (
            topic_name.startswith(_PROVISION_ROOT)
            or isinstance(principal_of(source_session), ProvisioningPrincipal)
        ):
            logger.info("not retaining a message on %r (provisioning traffic is never retained)", topic_name)
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt 0.12.1 sends every matching retained message without asking the topic plugins,
        # and on every CONNECT it does so for *all* filters anyone subscribed to. Ask first.
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        subscribers = self._subscriptions.get(topic_filter, [])
        if handler is None or all(s.client_id != session.client_id for s, _ in subscribers):
            # On CONNECT amqtt walks every filter anyone holds; only the session's own count.
            return
        sends: list[asyncio.Task[Any]] = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            sends.append(
                asyncio.create_task(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if sends:
            await asyncio.wait(sends)


class BrokerLink:
    """:class:`provisioning.ports.SessionControl` for services built before the broker exists."""

    def __init__(self) -> None:
        self.broker: MqttprovBroker | None = None

    def _target(self) -> MqttprovBroker:
        if self.broker is None:
            raise RuntimeError("the broker is not running")
        return self.broker

    async def deliver(self, client_id: str, topic: str, payload: bytes) -> bool:
        """See :meth:`MqttprovBroker.deliver`."""
        return await self._target().deliver(client_id, topic, payload)

    async def kick(self, client_id: str, reason: str) -> bool:
        """See :meth:`MqttprovBroker.kick`."""
        return await self._target().kick(client_id, reason)

    async def announce(self, topic: str, payload: bytes) -> None:
        """See :meth:`MqttprovBroker.announce`."""
        await self._target().announce(topic, payload)

    def live_principals(self) -> Iterator[tuple[str, Principal]]:
        """See :meth:`MqttprovBroker.live_principals`."""
        return self._target().live_principals()
