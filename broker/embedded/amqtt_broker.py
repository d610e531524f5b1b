"""Our narrow extensions of amqtt's :class:`~amqtt.broker.Broker` (pinned to amqtt 0.12.1), put together.

In three parts by job, each overriding its own methods of amqtt's broker:
:mod:`~broker.embedded.accepting`, :mod:`~broker.embedded.delivery` and
:mod:`~broker.embedded.control` (their shared state: :mod:`~broker.embedded.base`). Together they

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
  QoS 1/2 messages resent to a persistent session when it reconnects (see
  :mod:`broker.embedded.protocol`), queued messages without RETAIN and bounded, a clean session
  never resumed, a resumed session not sent retained messages again, and a take-over that
  completes before the new connection uses the session;
- read only whole, well-formed packets (see :mod:`broker.embedded.framing`);
- remove a subscription entry once nobody holds it, and bound what one session may subscribe
  and the topics it may use (see :mod:`broker.embedded.subscriptions`);
- tell :class:`~broker.embedded.plugins.sessions.SessionHooks` when a session goes live and when
  it ends;
- record who published each retained message, and clear a revoked principal's (see
  :mod:`broker.embedded.retained`);
- fire amqtt's broadcast event only for the topics its listeners declare (see
  :func:`_broadcast_topics`); sessions come from :mod:`broker.embedded.session` (see
  :mod:`broker.embedded.protocol`);
- match a publish against the filters it can match, and a new subscription against the retained
  topics it can match, through topic tries (see :mod:`broker.embedded.topictree`), not
  everything stored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from amqtt.events import BrokerEvents

from broker.embedded.accepting import Accepting
from broker.embedded.base import ConnectionLimits
from broker.embedded.control import Control
from broker.embedded.delivery import Delivery
from broker.embedded.plugins.auth import MqttprovTopicPlugin
from broker.embedded.plugins.sessions import SessionHooks
from broker.embedded.retained import RetainedPublishers
from broker.embedded.subscriptions import FilterTable
from broker.embedded.topictree import FilterTree, TopicTree
from broker.embedded.turns import ClientIdTurns
from config import BrokerSettings


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


class MqttprovBroker(Control, Accepting, Delivery):
    """amqtt's broker with the session controls and retained-message rules mqttprov relies on."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        limits: ConnectionLimits | None = None,
        session_hooks: SessionHooks | None = None,
    ) -> None:
        super().__init__(config)
        self.limits = limits or ConnectionLimits.of(BrokerSettings())
        self._session_hooks = session_hooks
        self.connect_timeout = self.limits.connect_timeout
        self._open = 0
        self._open_by_address = Counter()
        self.refused_over_limit = 0
        self.sessions_expired = 0
        self.dropped = Counter()
        self.turns = ClientIdTurns()
        self._acl_check = None
        # amqtt 0.12.1's list of topic plugins: no default, a rename must fail at start.
        topic_plugins = self.plugins_manager._topic_plugins
        if len(topic_plugins) == 1:
            (only,) = topic_plugins
            if isinstance(only, MqttprovTopicPlugin):
                self._acl_check = only.check
        self._broadcast_topics = _broadcast_topics(self.plugins_manager.plugins)
        #: The principal behind each retained message (see :meth:`retire`).
        self.retained_by = RetainedPublishers()
        self._subscriptions = FilterTable()  # amqtt's table, whose repr no longer costs a walk
        # Indexes of amqtt's subscription table and retained store, kept in step with them.
        self._filters = FilterTree()
        self._retained_topics = TopicTree()

    async def start(self) -> None:
        """amqtt's start, which empties the subscription table and retained store: their indexes too."""
        self._filters.clear()
        self._retained_topics.clear()
        self.retained_by.clear()
        await super().start()
