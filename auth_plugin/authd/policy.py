"""The ACL as external brokers need it: :func:`auth_plugin.acl.allows`, adjusted for brokers that
check a subscription once (not each delivery) and deliver provisioning replies through
subscriptions.

- No service account or device may subscribe to a filter that overlaps the reply topics
  (``#``, ``+/#``, ``provision/#``, ``+/reply/+``, ...): RabbitMQ, EMQX and VerneMQ would deliver
  every device's credentials through it.
- Provisioning requests are read only by an account whose rules name ``subscribe
  provision/request`` exactly (the provisioning worker), and only through that very filter (also
  as ``$share/<group>/provision/request``); replies are published only by an account with a
  ``publish provision/reply/...`` rule, to a ``provision/reply/<MAC>`` topic. A wildcard rule
  (``subscribe #``, ``publish #``) never grants either.
- A provisioning session may receive its own reply topic (Mosquitto asks about each delivery).
"""

from __future__ import annotations

from auth_plugin.acl import Action, allows
from auth_plugin.principals import AccountPrincipal, Principal, ProvisioningPrincipal
from provisioning.contract import REPLY_PREFIX, REQUEST_TOPIC, mac_of_reply_filter
from provisioning.topics import InvalidTopicError, matches, validate_filter

#: Every reply topic is ``provision/reply/<MAC>``: one level, no deeper.
REPLY_TOPICS = REPLY_PREFIX + "+"
_SHARED = "$share/"


def overlaps(first: str, second: str) -> bool:
    """True when some topic name matches both filters."""
    a, b = first.split("/"), second.split("/")
    for index in range(max(len(a), len(b)) + 1):
        left = a[index] if index < len(a) else None
        right = b[index] if index < len(b) else None
        if left == "#" or right == "#":
            return True  # '#' also matches its parent level (MQTT 3.1.1 §4.7.1.2)
        if left is None or right is None:
            return left is None and right is None
        if "+" not in (left, right) and left != right:
            return False
    return True  # pragma: no cover - the loop always returns


def unshared(topic_filter: str) -> str:
    """``$share/<group>/<filter>`` as ``<filter>``; any other filter as it is."""
    if topic_filter.startswith(_SHARED):
        _, _, rest = topic_filter[len(_SHARED) :].partition("/")
        return rest
    return topic_filter


def external_allows(principal: Principal | None, topic: str, action: Action) -> bool:
    """True only when ``principal`` may ``action`` on ``topic`` on an external broker."""
    if isinstance(principal, ProvisioningPrincipal):
        if action is Action.RECEIVE:
            return mac_of_reply_filter(topic) == principal.identity.mac
        return allows(principal, topic, action)
    if action is Action.SUBSCRIBE:
        return _subscribe(principal, unshared(topic))
    if isinstance(principal, AccountPrincipal) and topic.startswith(REPLY_PREFIX):
        return action is Action.PUBLISH and _publishes_replies(principal, topic)
    if isinstance(principal, AccountPrincipal) and topic == REQUEST_TOPIC and action is Action.RECEIVE:
        return REQUEST_TOPIC in principal.subscribe
    return allows(principal, topic, action)


def _subscribe(principal: Principal | None, topic_filter: str) -> bool:
    try:
        validate_filter(topic_filter)
    except InvalidTopicError:
        return False
    if overlaps(topic_filter, REPLY_TOPICS):
        return False
    if overlaps(topic_filter, REQUEST_TOPIC):
        return (
            isinstance(principal, AccountPrincipal)
            and topic_filter == REQUEST_TOPIC
            and REQUEST_TOPIC in principal.subscribe
        )
    return allows(principal, topic_filter, Action.SUBSCRIBE)


def _publishes_replies(principal: AccountPrincipal, topic: str) -> bool:
    if mac_of_reply_filter(topic) is None:
        return False
    return any(rule.startswith(REPLY_PREFIX) and matches(topic, rule) for rule in principal.publish)
