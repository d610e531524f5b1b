"""The topic ACL: what each kind of principal may publish, subscribe to and receive.

Decisions are plain string comparisons on data compiled at login; the broker awaits this check
for every subscriber of every message, so it must stay cheap.
"""

from __future__ import annotations

import enum

from auth_plugin.principals import DevicePrincipal, Principal, ProvisioningPrincipal
from provisioning.contract import REQUEST_TOPIC, mac_of_reply_filter


class Action(enum.StrEnum):
    """The three checks amqtt asks for (values match ``amqtt.contexts.Action``)."""

    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"
    RECEIVE = "receive"


def allows(principal: Principal | None, topic: str, action: Action) -> bool:
    """True only when ``principal`` may perform ``action`` on ``topic`` (a filter for SUBSCRIBE)."""
    if principal is None or not topic:
        return False
    if isinstance(principal, ProvisioningPrincipal):
        return _provisioning(principal, topic, action)
    return _device(principal, topic, action)


def _provisioning(principal: ProvisioningPrincipal, topic: str, action: Action) -> bool:
    if action is Action.PUBLISH:
        return topic == REQUEST_TOPIC
    if action is Action.SUBSCRIBE:
        # Only its own reply topic, in any notation of its own MAC; wildcards never parse as a MAC.
        return mac_of_reply_filter(topic) == principal.identity.mac
    # Replies are delivered to the session directly, never through subscriptions.
    return False


def _device(principal: DevicePrincipal, topic: str, action: Action) -> bool:
    namespace = principal.namespace
    if action is Action.SUBSCRIBE:
        # ``devices/<id>/#`` also matches ``devices/<id>`` itself.
        return topic.startswith(namespace) or topic == namespace[:-1] + "/#" or topic == namespace[:-1]
    return topic.startswith(namespace) or topic == namespace[:-1]
