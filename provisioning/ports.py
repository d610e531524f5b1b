"""What the provisioning service needs from the broker, as a protocol (the broker implements it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from provisioning.registry import DeviceInfo


class SessionControl(Protocol):
    """Deliver to one session, or end one session, by client id."""

    async def deliver(self, client_id: str, topic: str, payload: bytes) -> bool:
        """Send one message to that session only (never through subscriptions); False if gone."""
        ...

    async def kick(self, client_id: str, reason: str) -> bool:
        """Disconnect the session without publishing its will; False if it was not connected."""
        ...

    async def announce(self, topic: str, payload: bytes) -> None:
        """Publish a broker-originated message to whoever the ACL lets receive it."""
        ...


class CredentialSink(Protocol):
    """Somewhere else a freshly issued device password must go (an external broker's own store)."""

    async def issued(self, device: DeviceInfo, password: str, password_hash: str) -> None:
        """Called after the commit and before the reply; raising makes the reply INTERNAL."""
        ...
