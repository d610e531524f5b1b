"""Accepting connections: a CONNECT is authenticated before it may touch the session table.

amqtt 0.12.1 takes over, deletes or rewrites a live session of the same client id first, whatever
the credentials. Here the CONNECT is read within ``broker.connect_timeout`` (whole, checked
packets: :mod:`~broker.embedded.framing`), refused over the connection limits before any
password check, answered with the right CONNACK code, and only then given the session amqtt's
rules say it gets: never a clean, anonymous, revoked or other principal's session, and a
take-over that completes before the new connection uses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NoReturn

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Server
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id
from transitions import MachineError

from auth_plugin.logsafe import BurstLog, shown
from auth_plugin.principals import (
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    AccountPrincipal,
    ProvisioningPrincipal,
    principal_of,
    refusal_code,
)
from broker.embedded.base import CONNECTING, OFFLINE_SINCE, REVOKED, BrokerBase, over_limits
from broker.embedded.framing import FramingReader
from broker.embedded.ownership import account_client_id_allowed, owner
from broker.embedded.protocol import KeepAliveHandler, close_transport, grace
from broker.errors import REFUSED_MARKER

logger = logging.getLogger(__name__)
# Refusals a client can repeat at will: one line per burst (see auth_plugin.logsafe).
_no_connect = BurstLog(logger, "connections closed without a CONNECT")

_PREAUTHENTICATED = "mqttprov.preauthenticated"
#: A take-over waits at most this long for the old connection to finish before going on.
TAKEOVER_TIMEOUT = 5.0


class Accepting(BrokerBase):
    """From the socket's accept to the session's message loop, and the connection's end."""

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
            over_limits.refused("refusing %s: an account's client id reads as a MAC", peer)
            await self._refuse(writer, NOT_AUTHORIZED)
        if fresh.will_flag and fresh.will_topic and self.limits.topics.topic_refusal(fresh.will_topic):
            over_limits.refused("refusing %s: its will topic is over the topic limits", peer)
            await self._refuse(writer, NOT_AUTHORIZED)
        if isinstance(principal, ProvisioningPrincipal):
            # Anonymous: amqtt kept a provisioning session that asked for clean session 0 in its
            # table forever after it left, with its subscription - one per MAC anyone cares to
            # make up. As "anonymous" it is dropped on disconnect and never queued for (its
            # replies are delivered directly, never through a queue).
            fresh.is_anonymous = True
        handler.max_queued = self.limits.max_queued_messages
        handler.drops = self.dropped
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
            or existing[0].attributes.get(REVOKED)
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
        server: Server,  # noqa: ARG002 - amqtt's signature; the lifetime below needs no server
        listener_name: str,
    ) -> None:
        """amqtt's connection lifetime; afterwards the handler says it is finished (see _end_live)."""
        try:
            await self._session_lifetime(reader, writer, client_session, handler, listener_name)
        finally:
            self.turns.give_back(client_session)
            if client_session.attributes.get(REVOKED):
                await self._discard(client_session)
            if isinstance(handler, KeepAliveHandler):
                handler.finished.set()

    async def _session_lifetime(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        listener_name: str,
    ) -> None:
        """amqtt 0.12.1's ``Broker._handle_client_session``, less one walk.

        amqtt offers, on every CONNECT, the retained messages of every filter anyone holds to the
        new session, one call per filter (``_publish_retained_messages_for_subscription``, which
        refuses them here: they are for new subscriptions only). With 10,000 devices subscribed
        that walk cost about 5 ms a CONNECT, so a fleet reconnecting after a restart cost the
        square of its size. The rest is amqtt's, in its order (tests/test_races.py pins it).
        """
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if client_session.client_id is None:
            raise BrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                await asyncio.sleep(1)  # amqtt's "reconnecting too quickly, make it wait"
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

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
        client_session.attributes.pop(CONNECTING, None)
        client_session.attributes.pop(OFFLINE_SINCE, None)
        # From here on the connection can be taken over: let the next CONNECT for its id in.
        self.turns.give_back(client_session)
        hooks = self._session_hooks
        # Called here rather than as amqtt's client_connected/client_disconnected events (a task
        # per call); the end is recorded however the loop ends, a shutdown's cancel included. A
        # take-over ends the old loop before the new connection gets here (see _adopt).
        if hooks is not None:
            hooks.started(client_session.client_id, client_session)
        try:
            await super()._client_message_loop(client_session, handler)
        finally:
            client_session.attributes[OFFLINE_SINCE] = time.monotonic()
            if hooks is not None:
                hooks.ended(client_session)

    async def _authenticate(self, session: Session, _: Any) -> bool:
        # Already decided in _initialize_client_session; amqtt asks again on the adopted session.
        return session.attributes.pop(_PREAUTHENTICATED, False) is True
