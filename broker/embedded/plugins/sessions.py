"""What happens when a session goes live and when it ends: presence, and a last revocation check.

The broker calls these directly (see ``MqttprovBroker._client_message_loop``), in the order the
sessions go live and end: amqtt's ``client_connected``/``client_disconnected`` events would run
each call as a task of its own, two per connection, which a reconnect storm pays for.
"""

from __future__ import annotations

from amqtt.session import Session

from auth_plugin.presence import PresenceRecorder
from auth_plugin.principals import DevicePrincipal, principal_of
from auth_plugin.revocation import Revoker


class SessionHooks:
    """Record a device online/offline and re-check a credential that changed during CONNECT."""

    def __init__(self, presence: PresenceRecorder, revoker: Revoker) -> None:
        self._presence = presence
        self._revoker = revoker

    def started(self, client_id: str, session: Session) -> None:
        """The session was accepted (CONNACK 0) and its packets are about to be handled."""
        principal = principal_of(session)
        if principal is None:
            return
        self._revoker.confirm(client_id, principal)
        if isinstance(principal, DevicePrincipal):
            self._presence.online(principal.device_id)

    def ended(self, session: Session) -> None:
        """The session's connection ended, however it ended."""
        principal = principal_of(session)
        if isinstance(principal, DevicePrincipal):
            self._presence.offline(principal.device_id)
