"""The topic ACL: what each kind of principal may publish, subscribe to and receive.

Decisions are string comparisons on rules compiled at login; the broker awaits this check for
every subscriber of every message, so it must stay cheap. Whatever a principal's rules say,
nobody receives ``provision/...`` traffic through subscriptions (replies go to the requesting
session directly) and only provisioning sessions publish there.
"""

from __future__ import annotations

import enum

from auth_plugin.principals import AccountPrincipal, DevicePrincipal, Principal, ProvisioningPrincipal
from provisioning.contract import EVENT_PREFIX, REQUEST_TOPIC, mac_of_reply_filter
from provisioning.topics import covers, matches

PROVISION_ROOT = "provision/"
#: The broker's own namespace: publishing there takes a rule that names it, never a wildcard.
BROKER_ROOT = EVENT_PREFIX.split("/", 1)[0] + "/"


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
    if action is not Action.SUBSCRIBE and topic.startswith(PROVISION_ROOT):
        return False
    if isinstance(principal, DevicePrincipal):
        return _device(principal, topic, action)
    return _account(principal, topic, action)


def _provisioning(principal: ProvisioningPrincipal, topic: str, action: Action) -> bool:
    if action is Action.PUBLISH:
        return topic == REQUEST_TOPIC
    if action is Action.SUBSCRIBE:
        # Only its own reply topic, in any notation of its own MAC; wildcards never parse as a MAC.
        return mac_of_reply_filter(topic) == principal.identity.mac
    # Replies are delivered to the session directly, never through subscriptions.
    return False


def _device(principal: DevicePrincipal, topic: str, action: Action) -> bool:
    if action is Action.SUBSCRIBE:
        return covers(principal.namespace, topic)
    return matches(topic, principal.namespace)


def _account(principal: AccountPrincipal, topic: str, action: Action) -> bool:
    if action is Action.SUBSCRIBE:
        return any(covers(rule, topic) for rule in principal.subscribe)
    if action is Action.PUBLISH:
        # Back ends trust mqttprov/events/... to come from the broker: ``publish #`` must not
        # let an account forge an enrolment, as ``#`` does not reach ``$SYS`` either.
        rules = principal.publish
        if topic.startswith(BROKER_ROOT):
            rules = tuple(rule for rule in rules if rule.startswith(BROKER_ROOT))
        return any(matches(topic, rule) for rule in rules)
    return any(matches(topic, rule) for rule in principal.subscribe)
