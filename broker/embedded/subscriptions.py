"""What one session may hold in the broker's subscription table, and the filters it holds.

amqtt 0.12.1 keeps one table, ``{filter: [(session, qos), ...]}``, walked by every publish and
(for retained messages) every CONNECT, and it never bounds what one client puts there. The bounds
here are ``[broker]`` settings (see :class:`TopicLimits`); a session's own filters are kept on the
session too, so that ending it removes exactly its entries instead of walking the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from auth_plugin.principals import ProvisioningPrincipal, principal_of
from config import BrokerSettings

_FILTERS = "mqttprov.filters"


@dataclass(frozen=True)
class TopicLimits:
    """``[broker]`` bounds on topics and subscriptions (defaults no real device needs to exceed)."""

    max_filters_per_subscribe: int
    max_subscriptions_per_session: int
    max_topic_length: int
    max_topic_levels: int

    @classmethod
    def of(cls, settings: BrokerSettings) -> TopicLimits:
        """The bounds ``settings`` set (their defaults live there, and only there)."""
        return cls(
            max_filters_per_subscribe=settings.max_filters_per_subscribe,
            max_subscriptions_per_session=settings.max_subscriptions_per_session,
            max_topic_length=settings.max_topic_length,
            max_topic_levels=settings.max_topic_levels,
        )

    def topic_refusal(self, topic: str) -> str | None:
        """Why ``topic`` (a name or a filter) is over the bounds, or None."""
        if len(topic) > self.max_topic_length:
            return f"longer than {self.max_topic_length} characters"
        if topic.count("/") >= self.max_topic_levels:
            return f"deeper than {self.max_topic_levels} levels"
        return None

    def subscribe_refusal(self, session: Any, topic_filter: str) -> str | None:
        """Why ``session`` may not add ``topic_filter`` to what it holds, or None."""
        too_big = self.topic_refusal(topic_filter)
        if too_big is not None:
            return f"filter {too_big}"
        held = held_filters(session)
        if topic_filter in held:
            return None  # a repeated SUBSCRIBE replaces the QoS [MQTT-3.8.4-3]: nothing added
        if held and isinstance(principal_of(session), ProvisioningPrincipal):
            # Its one reply filter, in whichever notation of its MAC, one at a time: every
            # spelling (letter case x four notations) is a distinct entry in the table.
            return "a provisioning session holds one reply filter at a time"
        if len(held) >= self.max_subscriptions_per_session:
            return f"already holds {self.max_subscriptions_per_session} subscriptions"
        return None


def held_filters(session: Any) -> set[str]:
    """The filters ``session`` holds in the broker's table (kept on the session, across resumes)."""
    attributes: dict[str, Any] = session.attributes
    found = attributes.get(_FILTERS)
    if not isinstance(found, set):
        found = set()
        attributes[_FILTERS] = found
    return found


class FilterTable(dict[str, list[tuple[Any, int]]]):
    """amqtt's subscription table (filter → ``(session, qos)`` entries), with a short ``repr``.

    amqtt 0.12.1 logs ``repr(self._subscriptions)`` at DEBUG after every SUBSCRIBE, built before
    the logger can decline it: with 10,000 devices subscribed that string cost tens of
    milliseconds of the event loop per SUBSCRIBE.
    """

    def __repr__(self) -> str:
        return f"<FilterTable: {len(self)} filters>"
