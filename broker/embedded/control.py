"""The control surface: what the services ask of the running broker, and the link they hold.

Deliver to one session directly (provisioning replies never pass subscriptions), end a session
for good without its will (revocation, re-provisioning), announce broker events, list the
principals it holds and clear a revoked one's retained messages; and the listeners' ports.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator

from auth_plugin.logsafe import shown
from auth_plugin.principals import Principal, principal_of
from broker.embedded.base import OFFLINE_SINCE, REVOKED, BrokerBase
from broker.embedded.retained import publisher_name

logger = logging.getLogger(__name__)

#: Reply publish waits at most this long for the device's PUBACK.
DELIVERY_TIMEOUT = 10.0


class Control(BrokerBase):
    """The calls :class:`BrokerLink` hands on, and the listeners' life cycle."""

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
        session.attributes[REVOKED] = True
        session.will_flag = False
        session.will_message = None
        if live:
            logger.info("disconnecting client %s: %s", shown(client_id), reason)
            await handler.handle_connection_closed()
        else:
            logger.info("discarding the offline session of client %s: %s", shown(client_id), reason)
            await self._discard(session)
        return True

    async def expire_offline(self, expiry: float, now: float) -> int:
        """Discard the offline persistent sessions whose connection ended ``expiry`` seconds or
        more before ``now`` (``time.monotonic``), with their subscriptions and queued messages;
        how many. MQTT 3.1.1 keeps such a session for ever; a broker cannot."""
        expired = 0
        for client_id, (session, _handler) in list(self._sessions.items()):
            since = session.attributes.get(OFFLINE_SINCE)
            if (
                since is None
                or session.transitions.state == "connected"
                or session.clean_session is not False
                or now - since < expiry
            ):
                continue
            logger.info("discarding the offline session of client %s: expired", shown(client_id))
            await self._discard(session)
            expired += 1
        self.sessions_expired += expired
        return expired

    async def announce(self, topic: str, payload: bytes) -> None:
        """Broadcast a broker-originated message (subscribers' RECEIVE checks still apply)."""
        await self.internal_message_broadcast(topic, payload, 0)

    @property
    def open_connections(self) -> int:
        """Connections open now, from accept to close (authenticated or not yet)."""
        return self._open

    def listening(self) -> bool:
        """True while every listener has a socket that accepts connections."""
        for server in self._servers.values():
            instance = server.instance
            if instance is None or not instance.sockets:
                return False
            serving = getattr(instance, "is_serving", None)  # asyncio's; websockets' has none
            if serving is not None and not serving():
                return False
        return bool(self._servers)

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


class BrokerLink:
    """:class:`provisioning.ports.SessionControl` for services built before the broker exists."""

    def __init__(self) -> None:
        self.broker: Control | None = None

    def _target(self) -> Control:
        if self.broker is None:
            raise RuntimeError("the broker is not running")
        return self.broker

    async def deliver(self, client_id: str, topic: str, payload: bytes) -> bool:
        """See :meth:`Control.deliver`."""
        return await self._target().deliver(client_id, topic, payload)

    async def kick(self, client_id: str, reason: str) -> bool:
        """See :meth:`Control.kick`."""
        return await self._target().kick(client_id, reason)

    async def announce(self, topic: str, payload: bytes) -> None:
        """See :meth:`Control.announce`."""
        await self._target().announce(topic, payload)

    def live_principals(self) -> Iterator[tuple[str, Principal]]:
        """For the revocation follower: every session the broker keeps for a principal, offline
        persistent ones too (:meth:`Control.held_principals`), so that :meth:`kick`
        discards what a revoked principal left behind, not only what is connected."""
        return self._target().held_principals()

    def retained_publishers(self, names: Collection[str]) -> set[Principal]:
        """See :meth:`Control.retained_publishers`."""
        return self._target().retained_publishers(names)

    async def retire(self, principal: Principal) -> int:
        """See :meth:`Control.retire`."""
        return await self._target().retire(principal)

    async def expire_offline(self, expiry: float, now: float) -> int:
        """See :meth:`Control.expire_offline`."""
        return await self._target().expire_offline(expiry, now)
