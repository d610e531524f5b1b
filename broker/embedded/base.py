"""What the parts of :class:`~broker.embedded.amqtt_broker.MqttprovBroker` share.

The broker is amqtt's :class:`~amqtt.broker.Broker` with our overrides, in three parts by job:
:mod:`~broker.embedded.accepting` (CONNECT up to the message loop),
:mod:`~broker.embedded.delivery` (subscriptions, fan-out, retained messages) and
:mod:`~broker.embedded.control` (what the services may ask of it). Each part subclasses
:class:`BrokerBase`, which names the state they share; :mod:`~broker.embedded.amqtt_broker` sets
it up and puts the parts together.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.session import Session

from auth_plugin.logsafe import BurstLog
from broker.embedded.plugins.sessions import SessionHooks
from broker.embedded.retained import RetainedPublishers
from broker.embedded.subscriptions import TopicLimits
from broker.embedded.topictree import FilterTree, TopicTree
from broker.embedded.turns import ClientIdTurns
from config import BrokerSettings

logger = logging.getLogger(__name__)
# Refused at CONNECT (accepting) and at SUBSCRIBE (delivery): one burst count for both.
over_limits = BurstLog(logger, "refused over the topic and subscription limits")

#: Session marks (namespaced ``Session.attributes`` keys) more than one part reads.
#: Between CONNACK and the message loop: old subscriptions are not new ones (no retained resend).
CONNECTING = "mqttprov.connecting"
#: Set on a session whose principal was revoked: never resumed, discarded once its connection ends.
REVOKED = "mqttprov.revoked"
#: When a session's connection ended (``time.monotonic``): an offline persistent session is
#: discarded ``[broker] session_expiry`` seconds later (see ``Control.expire_offline``).
OFFLINE_SINCE = "mqttprov.offline_since"


@dataclass(frozen=True)
class ConnectionLimits:
    """``[broker]`` limits the broker enforces itself."""

    connect_timeout: float
    max_connections: int
    max_connections_per_address: int
    max_queued_messages: int
    max_packet_bytes: int
    topics: TopicLimits

    @classmethod
    def of(cls, settings: BrokerSettings) -> ConnectionLimits:
        """The limits ``settings`` set (their defaults live there, and only there)."""
        return cls(
            connect_timeout=settings.connect_timeout,
            max_connections=settings.max_connections,
            max_connections_per_address=settings.max_connections_per_address,
            max_queued_messages=settings.max_queued_messages,
            max_packet_bytes=settings.max_packet_bytes,
            topics=TopicLimits.of(settings),
        )


class BrokerBase(Broker):
    """amqtt's broker and the state our parts keep beside its tables (set in ``MqttprovBroker``)."""

    limits: ConnectionLimits
    connect_timeout: float
    refused_over_limit: int
    #: Offline persistent sessions discarded after ``[broker] session_expiry``, since the start.
    sessions_expired: int
    #: Messages dropped over the bounds, by reason (see ``BoundedFlow.drops``), since the start.
    dropped: Counter[str]
    turns: ClientIdTurns
    #: The principal behind each retained message (see ``Control.retire``).
    retained_by: RetainedPublishers
    _session_hooks: SessionHooks | None
    _open: int
    _open_by_address: Counter[str]
    #: Our ACL's check when it is amqtt's only topic plugin, else None (see ``_topic_filtering``).
    _acl_check: Callable[[Session, str, Any], bool] | None
    #: The topics whose broadcast some plugin acts on, None for all of them.
    _broadcast_topics: frozenset[str] | None
    # Indexes of amqtt's subscription table and retained store, kept in step with them.
    _filters: FilterTree
    _retained_topics: TopicTree
