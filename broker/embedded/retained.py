"""Who published each retained message, so that a revoked principal's messages can be cleared.

amqtt 0.12.1 keeps a retained message until someone publishes an empty one on its topic: a
decommissioned device's last state, or what a leaked account credential retained, went on
reaching every new subscriber its ACL allowed. The broker records the principal (with its
credential tag) behind each retained message; the revocation follower asks which of them are
among the usernames that changed and has the broker clear those whose credential is no longer
current (see :class:`auth_plugin.revocation.RetainedMessages`). Messages retained by the broker
itself, or by a session without a principal, have no publisher here and are never retired.
"""

from __future__ import annotations

from collections.abc import Collection

from auth_plugin.principals import AccountPrincipal, DevicePrincipal, Principal


def publisher_name(principal: Principal | None) -> str | None:
    """The username a credential change is recorded under, for the principals that have one."""
    if isinstance(principal, DevicePrincipal):
        return principal.username
    if isinstance(principal, AccountPrincipal):
        return principal.name
    return None


class RetainedPublishers:
    """The principal behind each retained topic, and each username's retained topics."""

    def __init__(self) -> None:
        self._by_topic: dict[str, Principal] = {}
        self._by_name: dict[str, set[str]] = {}

    def record(self, topic: str, principal: Principal | None) -> None:
        """``topic`` now retains a message published by ``principal`` (None: nobody's)."""
        self.forget(topic)
        name = publisher_name(principal)
        if principal is None or name is None:
            return
        self._by_topic[topic] = principal
        self._by_name.setdefault(name, set()).add(topic)

    def forget(self, topic: str) -> None:
        """``topic`` retains nothing any more (cleared, or replaced)."""
        principal = self._by_topic.pop(topic, None)
        name = publisher_name(principal)
        if name is None:
            return
        topics = self._by_name[name]
        topics.discard(topic)
        if not topics:
            del self._by_name[name]

    def publisher(self, topic: str) -> Principal | None:
        """Who published the message ``topic`` retains, if it was a principal."""
        return self._by_topic.get(topic)

    def principals(self, names: Collection[str]) -> set[Principal]:
        """The distinct principals, among those named ``names``, that retained something."""
        return {self._by_topic[topic] for name in names for topic in self._by_name.get(name, ())}

    def topics_of(self, principal: Principal) -> list[str]:
        """The topics whose retained message ``principal`` (this very credential) published."""
        name = publisher_name(principal)
        return [t for t in self._by_name.get(name or "", ()) if self._by_topic[t] == principal]

    def clear(self) -> None:
        """Nothing is retained (the broker started, or stopped)."""
        self._by_topic.clear()
        self._by_name.clear()

    def __len__(self) -> int:
        return len(self._by_topic)
