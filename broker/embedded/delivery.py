"""Delivery rules: subscriptions, the fan-out of a publish, and retained and queued messages.

The MQTT 3.1.1 rules amqtt 0.12.1 gets wrong: never above the published QoS, one copy per session
for overlapping subscriptions, a repeated SUBSCRIBE replaces the QoS, queued messages without
RETAIN and bounded, a resumed session not sent retained messages again, retained messages sent
only where the ACL allows RECEIVE, and nothing of provisioning retained. Also the bounds: a
subscription entry goes once nobody holds it, filters and topics within the limits
(:mod:`~broker.embedded.subscriptions`), and matching through topic tries
(:mod:`~broker.embedded.topictree`) rather than everything stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from amqtt.broker import RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session

from auth_plugin.logsafe import BurstLog, shown
from auth_plugin.principals import ProvisioningPrincipal, principal_of
from broker.embedded.base import CONNECTING, BrokerBase, over_limits
from broker.embedded.subscriptions import held_filters

logger = logging.getLogger(__name__)
# Refusals a client can repeat at will: one line per burst of each kind (see auth_plugin.logsafe).
_bad_publish = BurstLog(logger, "connections closed for a bad topic")
_not_retained = BurstLog(logger, "messages not retained (provisioning traffic)")

_PROVISION_ROOT = "provision/"
#: Retained messages matched against a wildcard filter between two yields to the event loop.
RETAINED_SCAN_SLICE = 500
_SUBSCRIBE_FAILURE = 0x80
_DROPPED_WHILE_OFFLINE = "mqttprov.dropped_while_offline"


class Delivery(BrokerBase):
    """amqtt's subscription, publish and retained-message paths, with the rules above."""

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # amqtt 0.12.1 runs each check as one task per topic plugin and gathers them, for every
        # subscriber of every message. With our ACL as the only topic plugin, ask it directly:
        # the same answer without two tasks per delivery (the throughput benchmark measures it).
        if self._acl_check is None:
            return bool(await super()._topic_filtering(session, topic, action))
        return self._acl_check(session, topic, action)

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

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt 0.12.1 sends every matching retained message without asking the topic plugins,
        # and on every CONNECT it does so for *all* filters anyone subscribed to. Ask first.
        topic_filter, qos = subscription
        if session.attributes.get(CONNECTING):
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
            over_limits.refused(
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
            over_limits.refused(
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
        self.dropped["offline_queue_full"] += 1
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
        session.attributes[CONNECTING] = True
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
