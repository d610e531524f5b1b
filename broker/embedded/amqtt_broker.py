"""Our narrow extensions of amqtt's :class:`~amqtt.broker.Broker` (pinned to amqtt 0.12.1).

- authenticate a CONNECT *before* it may touch the session table (amqtt takes over, deletes or
  rewrites a live session of the same client id first, whatever the credentials);
- close a connection that sends no CONNECT within ``broker.connect_timeout``;
- never keep a refused session, and answer a refusal with the right CONNACK code (4 or 5);
- enforce keep-alive (see :mod:`broker.embedded.protocol`);
- deliver a message to one session directly (provisioning replies never pass subscriptions);
- disconnect one session without its will (revocation, re-provisioning);
- never retain what a provisioning session publishes or anything under ``provision/``;
- send retained messages only where the topic ACL allows RECEIVE (amqtt skips that check);
- MQTT 3.1.1 delivery rules amqtt gets wrong: never above the published QoS, one copy per
  session for overlapping subscriptions, a repeated SUBSCRIBE replaces the QoS, unacknowledged
  QoS 1/2 messages resent to a persistent session when it reconnects (see :mod:`broker.embedded.protocol`),
  queued messages without RETAIN and bounded, a clean session never resumed, a resumed session
  not sent retained messages again, and a take-over that completes before the new connection
  uses the session;
- read only whole, well-formed packets (see :mod:`broker.embedded.framing`).
- remove a subscription entry once nobody holds it, and bound what one session may subscribe
  and the topics it may use (see :mod:`broker.embedded.subscriptions`);
- tell :class:`~broker.embedded.plugins.sessions.SessionHooks` when a session goes live and when it ends;
- record who published each retained message, and clear a revoked principal's (see
  :mod:`broker.embedded.retained`);
- fire amqtt's broadcast event only for the topics its listeners declare (see
  :func:`_broadcast_topics`); sessions come from :mod:`broker.embedded.session` (see
  :mod:`broker.embedded.protocol`);
- match a publish against the filters it can match, and a new subscription against the retained
  topics it can match, through topic tries (see :mod:`broker.embedded.topictree`), not everything stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from auth_plugin.logsafe import BurstLog, shown
from auth_plugin.principals import (
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    AccountPrincipal,
    Principal,
    ProvisioningPrincipal,
    principal_of,
    refusal_code,
)
from broker.embedded.framing import FramingReader
from broker.embedded.ownership import account_client_id_allowed, owner
from broker.embedded.plugins.auth import MqttprovTopicPlugin
from broker.embedded.plugins.sessions import SessionHooks
from broker.embedded.protocol import KeepAliveHandler, close_transport, grace
from broker.embedded.retained import RetainedPublishers, publisher_name
from broker.embedded.subscriptions import TopicLimits, held_filters
from broker.embedded.topictree import FilterTree, TopicTree
from broker.embedded.turns import ClientIdTurns
from broker.errors import REFUSED_MARKER

logger = logging.getLogger(__name__)
# Refusals a client can repeat at will: one line per burst of each kind (see auth_plugin.logsafe).
_no_connect = BurstLog(logger, "connections closed without a CONNECT")
_over_limits = BurstLog(logger, "refused over the topic and subscription limits")
_bad_publish = BurstLog(logger, "connections closed for a bad topic")
_not_retained = BurstLog(logger, "messages not retained (provisioning traffic)")

#: Reply publish waits at most this long for the device's PUBACK.
DELIVERY_TIMEOUT = 10.0
_PROVISION_ROOT = "provision/"
_PREAUTHENTICATED = "mqttprov.preauthenticated"
#: Retained messages matched against a wildcard filter between two yields to the event loop.
RETAINED_SCAN_SLICE = 500
#: A take-over waits at most this long for the old connection to finish before going on.
TAKEOVER_TIMEOUT = 5.0
_SUBSCRIBE_FAILURE = 0x80
_DROPPED_WHILE_OFFLINE = "mqttprov.dropped_while_offline"
_CONNECTING = "mqttprov.connecting"
#: Set on a session whose principal was revoked: never resumed, discarded once its connection ends.
_REVOKED = "mqttprov.revoked"


@dataclass(frozen=True)
class ConnectionLimits:
    """``[broker]`` limits the broker enforces itself."""

    connect_timeout: float = 10.0
    max_connections: int = 100_000
    max_connections_per_address: int = 2_000
    max_queued_messages: int = 1_000
    max_packet_bytes: int = 1_048_576
    topics: TopicLimits = field(default_factory=TopicLimits)


def _broadcast_topics(plugins: Iterable[Any]) -> frozenset[str] | None:
    """The only topics whose broadcast any plugin acts on, or None when some plugin wants them all.

    amqtt runs every event as a task per listening plugin. A listener that declares
    ``broadcast_topics`` (the provisioning plugin: ``provision/request``) acts on those alone,
    so when every listener declares them, a message on any other topic fires no event at all.
    """
    topics: set[str] = set()
    for plugin in plugins:
        if not hasattr(plugin, f"on_{BrokerEvents.MESSAGE_BROADCAST.value}"):
            continue
        declared = getattr(plugin, "broadcast_topics", None)
        if not isinstance(declared, frozenset):
            return None
        topics |= declared
    return frozenset(topics)


class MqttprovBroker(Broker):
    """amqtt's broker with the session controls and retained-message rules mqttprov relies on."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        limits: ConnectionLimits | None = None,
        session_hooks: SessionHooks | None = None,
    ) -> None:
        super().__init__(config)
        self.limits = limits or ConnectionLimits()
        self._session_hooks = session_hooks
        self.connect_timeout = self.limits.connect_timeout
        self._open = 0
        self._open_by_address: Counter[str] = Counter()
        self.refused_over_limit = 0
        self.turns = ClientIdTurns()
        self._acl_check: Callable[[Session, str, Any], bool] | None = None
        # amqtt 0.12.1's list of topic plugins: no default, a rename must fail at start.
        topic_plugins = self.plugins_manager._topic_plugins
        if len(topic_plugins) == 1:
            (only,) = topic_plugins
            if isinstance(only, MqttprovTopicPlugin):
                self._acl_check = only.check
        self._broadcast_topics = _broadcast_topics(self.plugins_manager.plugins)
        #: The principal behind each retained message (see :meth:`retire`).
        self.retained_by = RetainedPublishers()
        # Indexes of amqtt's subscription table and retained store, kept in step with them.
        self._filters = FilterTree()
        self._retained_topics = TopicTree()

    async def start(self) -> None:
        """amqtt's start, which empties the subscription table and retained store: their indexes too."""
        self._filters.clear()
        self._retained_topics.clear()
        self.retained_by.clear()
        await super().start()

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # amqtt 0.12.1 runs each check as one task per topic plugin and gathers them, for every
        # subscriber of every message. With our ACL as the only topic plugin, ask it directly:
        # the same answer without two tasks per delivery (the throughput benchmark measures it).
        if self._acl_check is None:
            return bool(await super()._topic_filtering(session, topic, action))
        return self._acl_check(session, topic, action)

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        # Count every open connection by source address for the limits checked at CONNECT.
        peer = writer.get_peer_info()
        address = str(peer[0]) if peer else "?"
        reader = FramingReader(
            reader,
            peer=f"{address}:{peer[1]}" if peer else "?",
            max_packet_bytes=self.limits.max_packet_bytes,
            frame_timeout=self.limits.connect_timeout,
        )
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
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the read in a task of
            # its own, one more task per connection on the hot path of a reconnect storm.
            async with asyncio.timeout(self.connect_timeout):
                handler, fresh = await KeepAliveHandler.init_from_connect(
                    reader, writer, self.plugins_manager
                )
        except TimeoutError as exc:
            _no_connect.refused("closing %s: no CONNECT within %ss", peer, self.connect_timeout)
            await writer.close()
            raise AMQTTError(REFUSED_MARKER) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except (NoDataError, AMQTTError) as exc:
            # The stream ended before a whole, well-formed CONNECT (amqtt left the socket open).
            await writer.close()
            raise AMQTTError(REFUSED_MARKER) from exc
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
        principal = principal_of(fresh)
        if isinstance(principal, AccountPrincipal) and not account_client_id_allowed(
            principal.name, fresh.client_id or ""
        ):
            # The authenticator lets NAME-<anything> in; a client id that reads as a MAC belongs
            # to that MAC's provisioning session (an account named e.g. "ab", made before names
            # like it were refused).
            _over_limits.refused("refusing %s: an account's client id reads as a MAC", peer)
            await self._refuse(writer, NOT_AUTHORIZED)
        if fresh.will_flag and fresh.will_topic and self.limits.topics.topic_refusal(fresh.will_topic):
            _over_limits.refused("refusing %s: its will topic is over the topic limits", peer)
            await self._refuse(writer, NOT_AUTHORIZED)
        if isinstance(principal, ProvisioningPrincipal):
            # Anonymous: amqtt kept a provisioning session that asked for clean session 0 in its
            # table forever after it left, with its subscription - one per MAC anyone cares to
            # make up. As "anonymous" it is dropped on disconnect and never queued for (its
            # replies are delivered directly, never through a queue).
            fresh.is_anonymous = True
        handler.max_queued = self.limits.max_queued_messages
        await self.turns.take(fresh.client_id or "", fresh)
        try:
            session = await self._adopt(fresh)
        except BaseException:
            self.turns.give_back(fresh)
            raise
        session.keep_alive = grace(fresh.keep_alive)
        session.attributes[_PREAUTHENTICATED] = True
        return handler, session

    @staticmethod
    async def _refuse(writer: WriterAdapter, code: int) -> NoReturn:
        # The client may be gone already (a flood does not wait for its CONNACK): the refusal
        # stands, and the socket is closed either way.
        try:
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
        except OSError:
            # amqtt's adapter marks itself closed before write_eof, which fails on a socket the
            # peer has left: close the transport under it, or it is left to the garbage collector.
            close_transport(writer)
        raise MQTTError(REFUSED_MARKER)

    async def _adopt(self, fresh: Session) -> Session:
        """amqtt's session-table rules for an authenticated CONNECT (MQTT 3.1.1 §3.1.2.4)."""
        client_id = fresh.client_id or ""
        existing = self._sessions.get(client_id)
        if existing is not None:
            await self._end_live(existing)
        if (
            fresh.clean_session
            or existing is None
            or existing[0].clean_session is not False
            or existing[0].is_anonymous
            or existing[0].attributes.get(_REVOKED)
            or owner(principal_of(existing[0])) != owner(principal_of(fresh))
        ):
            # A clean session ends with its connection [MQTT-3.1.2-6]: amqtt would resume one that
            # its monitor had not yet removed (up to 1 s), answering "session present"; so would
            # a provisioning session (anonymous: anyone may claim its MAC), for the next. A session
            # is resumed only by the principal, and the credential, it was created under.
            if existing is not None:
                await self._delete_session(client_id)
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
        # Wait until the old connection is finished (will sent, unacknowledged messages kept for
        # redelivery, session disconnected): in amqtt's own take-over the old connection's loop
        # marked a resumed session disconnected after the new one had it, and the device went deaf.
        session, handler = entry
        if session.transitions.state != "connected":
            return
        await handler.handle_connection_closed()
        await handler.stop()
        if isinstance(handler, KeepAliveHandler):
            try:
                await asyncio.wait_for(handler.finished.wait(), TAKEOVER_TIMEOUT)
            except TimeoutError:
                logger.warning(
                    "client %s: the connection taken over did not finish in time", shown(session.client_id)
                )

    async def _handle_client_session(  # noqa: PLR0917 - amqtt's signature
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        """amqtt's connection lifetime; afterwards the handler says it is finished (see _end_live)."""
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            self.turns.give_back(client_session)
            if client_session.attributes.get(_REVOKED):
                await self._discard(client_session)
            if isinstance(handler, KeepAliveHandler):
                handler.finished.set()

    async def _discard(self, session: Session) -> None:
        """Remove a session from the table with its subscriptions and queued messages."""
        client_id = session.client_id or ""
        current = self._sessions.get(client_id)
        if current is not None and current[0] is session:
            await self._delete_session(client_id)
        else:  # taken over already: only what it held itself
            await self._del_all_subscriptions(session)
            session.clear_queues()

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's loop over the session's packets; from here on, subscriptions are new ones."""
        client_session.attributes.pop(_CONNECTING, None)
        # From here on the connection can be taken over: let the next CONNECT for its id in.
        self.turns.give_back(client_session)
        hooks = self._session_hooks
        if hooks is None:
            await super()._client_message_loop(client_session, handler)
            return
        # Called here rather than as amqtt's client_connected/client_disconnected events (a task
        # per call); the end is recorded however the loop ends, a shutdown's cancel included. A
        # take-over ends the old loop before the new connection gets here (see _adopt).
        hooks.started(client_session.client_id, client_session)
        try:
            await super()._client_message_loop(client_session, handler)
        finally:
            hooks.ended(client_session)

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
            logger.warning("client %s did not acknowledge a direct delivery in time", shown(client_id))
            return False
        except Exception:
            logger.warning("could not deliver to client %s", shown(client_id), exc_info=True)
            return False
        return True

    async def kick(self, client_id: str, reason: str) -> bool:
        """End the session of ``client_id`` for good: no will, and nothing left to resume.

        A live session is disconnected and then discarded with its subscriptions and queued
        messages; an offline persistent session is discarded at once.
        """
        session, handler = self._sessions.get(client_id, (None, None))
        if session is None or handler is None:
            return False
        live = session.transitions.state == "connected"
        if not live and session.clean_session is not False:
            return False  # ended already; amqtt's monitor removes it
        session.attributes[_REVOKED] = True
        session.will_flag = False
        session.will_message = None
        if live:
            logger.info("disconnecting client %s: %s", shown(client_id), reason)
            await handler.handle_connection_closed()
        else:
            logger.info("discarding the offline session of client %s: %s", shown(client_id), reason)
            await self._discard(session)
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

    def held_principals(self) -> Iterator[tuple[str, Principal]]:
        """As :meth:`live_principals`, and the offline persistent sessions kept for a principal."""
        for client_id, (session, _handler) in list(self._sessions.items()):
            principal = principal_of(session)
            if principal is not None and (
                session.transitions.state == "connected" or session.clean_session is False
            ):
                yield client_id, principal

    async def close_listeners(self) -> None:
        """Close the listeners a failed :meth:`start` opened before the one that failed.

        amqtt 0.12.1 leaves them bound, and its ``shutdown`` refuses to run from the failed state.
        """
        for server in self._servers.values():
            await server.close_instance()

    def bound_port(self, listener_name: str) -> int:
        """The port a started listener bound: the one asked for, or the OS's choice for port 0.

        amqtt 0.12.1 keeps each listener's ``asyncio.Server`` (or websockets server) as
        ``Server.instance``. A host name that resolves to several addresses gets a socket each,
        each with its own port when asked for 0: the first is the one reported.
        """
        instance = self._servers[listener_name].instance
        sockets = instance.sockets if instance is not None else None
        if not sockets:
            raise RuntimeError(f"amqtt listener {listener_name!r} has no bound socket")
        port: int = sockets[0].getsockname()[1]
        return port

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
            _not_retained.refused(
                "not retaining a message on %s (provisioning traffic is never retained)", shown(topic_name)
            )
            return
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is None:
            return
        if topic_name in self._retained_messages:
            self.retained_by.record(topic_name, principal_of(source_session))
            self._retained_topics.add(topic_name)
        else:
            self.retained_by.forget(topic_name)
            self._retained_topics.remove(topic_name)

    def retained_publishers(self, names: Collection[str]) -> set[Principal]:
        """The principals named ``names`` whose retained messages the broker holds."""
        return self.retained_by.principals(names)

    async def retire(self, principal: Principal) -> int:
        """Clear every retained message ``principal`` published (its credential was revoked)."""
        cleared = 0
        for topic in self.retained_by.topics_of(principal):
            # Each clear awaits amqtt's event: someone else may have retained on a topic since.
            if self.retained_by.publisher(topic) == principal:
                await self.retain_message(None, topic, None)
                cleared += 1
        if cleared:
            logger.info(
                "cleared %d retained messages of a revoked credential of %s",
                cleared,
                shown(publisher_name(principal) or ""),
            )
        return cleared

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt 0.12.1 sends every matching retained message without asking the topic plugins,
        # and on every CONNECT it does so for *all* filters anyone subscribed to. Ask first.
        topic_filter, qos = subscription
        if session.attributes.get(_CONNECTING):
            # amqtt calls this on every CONNECT for every filter, so a resumed persistent session
            # got its retained messages again each time it reconnected. They are for *new*
            # subscriptions only [MQTT-3.3.1-6]: a retained command must not rerun per reconnect.
            return
        handler = self._get_handler(session)
        subscribers = self._subscriptions.get(topic_filter, [])
        if handler is None or all(s.client_id != session.client_id for s, _ in subscribers):
            # On CONNECT amqtt walks every filter anyone holds; only the session's own count.
            return
        sends: list[asyncio.Task[Any]] = []
        async for topic, retained in self._retained_matching(topic_filter):
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            sends.append(
                asyncio.create_task(
                    # amqtt's ``retained.qos or qos`` sent a QoS 0 retained message at the
                    # subscription's QoS [MQTT-3.8.4-6].
                    handler.mqtt_publish(
                        retained.topic,
                        retained.data,
                        qos if retained.qos is None else min(qos, retained.qos),
                        retain=True,
                    )
                )
            )
        if sends:
            await asyncio.wait(sends)

    async def _retained_matching(
        self, topic_filter: str
    ) -> AsyncIterator[tuple[str, RetainedApplicationMessage]]:
        """The retained messages ``topic_filter`` matches, without holding the loop on a big store.

        The topic trie gives the matching topics alone (amqtt matched the filter against every
        retained message); the loop is yielded to every :data:`RETAINED_SCAN_SLICE` of them, so a
        ``#`` over a large store lets other clients be served meanwhile.
        """
        for count, topic in enumerate(self._retained_topics.matching(topic_filter), 1):
            if count % RETAINED_SCAN_SLICE == 0:
                await asyncio.sleep(0)
            retained = self._retained_messages.get(topic)  # cleared meanwhile: skipped
            if retained is not None:
                yield topic, retained

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's checks and grant within the topic limits; subscribing again replaces the QoS."""
        refusal = self.limits.topics.subscribe_refusal(session, subscription[0])
        if refusal is not None:
            _over_limits.refused(
                "client %s: subscription to %s refused: %s",
                shown(session.client_id),
                shown(subscription[0]),
                refusal,
            )
            return _SUBSCRIBE_FAILURE
        granted: int = await super().add_subscription(subscription, session)
        if granted != _SUBSCRIBE_FAILURE:
            # amqtt 0.12.1 keeps the first subscription's QoS; MQTT replaces it [MQTT-3.8.4-3].
            entries = self._subscriptions.get(subscription[0], [])
            for index, (subscriber, _qos) in enumerate(entries):
                if subscriber.client_id == session.client_id:
                    entries[index] = (session, granted)
            held_filters(session).add(subscription[0])
            self._filters.add(subscription[0])
        return granted

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        """amqtt 0.12.1's, with the filters past ``max_filters_per_subscribe`` refused unread.

        One SUBSCRIBE may carry tens of thousands of filters (1 MB), each checked against every
        retained message: past the bound each gets SUBACK 0x80, one per filter as 3.1.1 wants.
        """
        subscriptions = subscribe_waiter.result()
        topics: list[tuple[str, int]] = subscriptions.topics
        allowed = topics[: self.limits.topics.max_filters_per_subscribe]
        codes = [await self.add_subscription(subscription, client_session) for subscription in allowed]
        if len(topics) > len(allowed):
            _over_limits.refused(
                "client %s: %d filters in one SUBSCRIBE refused (limit %d)",
                shown(client_session.client_id),
                len(topics) - len(allowed),
                len(allowed),
            )
            codes += [_SUBSCRIBE_FAILURE] * (len(topics) - len(allowed))
        await handler.mqtt_acknowledge_subscription(subscriptions.packet_id, codes)
        for subscription, code in zip(allowed, codes, strict=False):
            if code == _SUBSCRIBE_FAILURE:
                continue
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED,
                client_id=client_session.client_id,
                topic=subscription[0],
                qos=subscription[1],
            )
            await self._publish_retained_messages_for_subscription(subscription, client_session)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        """amqtt's, and an entry left empty goes too.

        amqtt 0.12.1 leaves the emptied entry in the table for good: every publish and every
        CONNECT walked it. Subscribing and unsubscribing thousands of spellings of one filter
        slowed the whole broker until it restarted.
        """
        deleted: int = super()._del_subscription(a_filter, session)
        held_filters(session).discard(a_filter)
        entries = self._subscriptions.get(a_filter)
        if entries is not None and not entries:
            del self._subscriptions[a_filter]
            self._filters.remove(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walks the whole table at every session end; the session's own filters suffice.
        for topic_filter in list(held_filters(session)):
            self._del_subscription(topic_filter, session)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # amqtt 0.12.1's, except that the broadcast carries the QoS the message was published with:
        # amqtt dropped it, and a QoS 0 publish reached a QoS 2 subscriber as QoS 2.
        app_message = wait_deliver.result()
        client_id = client_session.client_id
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_id, message=app_message
        )
        if app_message is None:
            return True
        topic = app_message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # [MQTT-4.7.3-1], [MQTT-3.3.2-2], [MQTT-4.7.2-1] (the first two are already stopped by
            # broker.embedded.framing). amqtt returned False here, which only left the message loop: the
            # connection stayed open and the session "connected" with nobody reading its packets.
            # End it as a lost link instead, so it is torn down (and its will sent) as usual.
            _bad_publish.refused(
                "closing client %s: it published to the invalid topic %s", shown(client_id), shown(topic)
            )
            await handler.handle_connection_closed()
            return True
        too_big = self.limits.topics.topic_refusal(topic)
        if too_big is not None:
            # MQTT 3.1.1 has no refusal for a PUBLISH: end it as for an invalid topic.
            _bad_publish.refused("closing client %s: it published to a topic %s", shown(client_id), too_big)
            await handler.handle_connection_closed()
            return True
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            logger.debug("client %s may not publish to %s", shown(client_id), shown(topic))
            return True
        if self._broadcast_topics is None or topic in self._broadcast_topics:
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_BROADCAST, client_id=client_id, message=app_message
            )
        await self._broadcast_message(client_session, topic, app_message.data, app_message.qos)
        if app_message.publish_packet and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        # Replaces amqtt 0.12.1's. A session whose subscriptions overlap gets one copy, at the
        # highest QoS they were granted [MQTT-3.3.5-1], never above the published QoS (the will's
        # QoS for a will) [MQTT-3.8.4-6]; amqtt sent one copy per matching filter, each at that
        # subscription's QoS. Offline persistent sessions queue QoS 1/2 messages, now bounded.
        broadcast = await self._broadcast_queue.get()
        topic: str = broadcast["topic"]
        published: int | None = broadcast.get("qos")
        targets: dict[str | None, tuple[Session, int]] = {}
        for topic_filter in self._filters.matching(topic):
            for subscriber, granted in self._subscriptions.get(topic_filter, ()):
                best = targets.get(subscriber.client_id)
                if best is None or granted > best[1]:
                    targets[subscriber.client_id] = (subscriber, granted)
        for subscriber, granted in targets.values():
            qos = granted if published is None else min(granted, published)
            if not await self._topic_filtering(subscriber, topic=topic, action=Action.RECEIVE):
                continue
            if subscriber.transitions.state == "connected":
                handler = self._get_handler(subscriber)
                if handler is not None:
                    publish = handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                    running_tasks.append(asyncio.ensure_future(publish))
            elif subscriber.clean_session is False and qos in (QOS_1, QOS_2) and not subscriber.is_anonymous:
                await self._queue_while_offline(broadcast, qos, subscriber)

    async def _queue_while_offline(self, broadcast: dict[str, Any], qos: int, session: Session) -> None:
        # amqtt's queue for an offline session has no bound; drop new messages beyond the limit.
        if session.retained_messages.qsize() < self.limits.max_queued_messages:
            await self._retain_broadcast_message(broadcast, qos, session)
            return
        dropped = session.attributes.get(_DROPPED_WHILE_OFFLINE, 0) + 1
        session.attributes[_DROPPED_WHILE_OFFLINE] = dropped
        if dropped == 1 or dropped % 1000 == 0:
            logger.warning(
                "client %s is offline with a full queue: %d messages dropped",
                shown(session.client_id),
                dropped,
            )

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # What was queued while the session was offline, oldest first. amqtt 0.12.1 sent it with
        # RETAIN set; it matches an established subscription, so the flag is 0 [MQTT-3.3.1-9].
        session.attributes.pop(_DROPPED_WHILE_OFFLINE, None)
        # amqtt goes on to offer retained messages for the session's old subscriptions; see
        # _publish_retained_messages_for_subscription. Lifted when the message loop starts.
        session.attributes[_CONNECTING] = True
        handler = self._get_handler(session)
        sends: list[asyncio.Future[Any]] = []
        while handler is not None and not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            sends.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)


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
        """For the revocation follower: every session the broker keeps for a principal, offline
        persistent ones too (:meth:`MqttprovBroker.held_principals`), so that :meth:`kick`
        discards what a revoked principal left behind, not only what is connected."""
        return self._target().held_principals()

    def retained_publishers(self, names: Collection[str]) -> set[Principal]:
        """See :meth:`MqttprovBroker.retained_publishers`."""
        return self._target().retained_publishers(names)

    async def retire(self, principal: Principal) -> int:
        """See :meth:`MqttprovBroker.retire`."""
        return await self._target().retire(principal)
