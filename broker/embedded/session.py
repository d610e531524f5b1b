"""A broker session's life cycle without a state machine object per connection (amqtt 0.12.1).

amqtt gives every :class:`~amqtt.session.Session` a ``transitions.Machine``: three states
(new, connected, disconnected) and five transitions, built from scratch for each connection. In
a reconnect storm that construction was the largest single cost on the event loop (about a fifth
of ours under cProfile), and it held about 16 KiB per connection. :class:`BrokerSession` keeps
the state in a plain attribute behind the same interface amqtt uses (``session.transitions``
with ``state``, ``connect()``, ``disconnect()``, ``is_connected()`` ...), with the same rules: a
``connect`` from ``connected`` raises :class:`transitions.MachineError` (amqtt's take-over path
catches it), ``disconnect`` is allowed from every state, and the connect and disconnect times
are recorded as amqtt's callbacks record them.
"""

from __future__ import annotations

import time
from math import floor

from amqtt.session import Session
from transitions import MachineError

NEW, CONNECTED, DISCONNECTED = "new", "connected", "disconnected"


class SessionStates:
    """The ``transitions`` view of one :class:`BrokerSession`; made on each access, so no cycle."""

    __slots__ = ("_session",)

    def __init__(self, session: BrokerSession) -> None:
        self._session = session

    @property
    def state(self) -> str:
        """``new``, ``connected`` or ``disconnected``."""
        return self._session.lifecycle_state

    def connect(self) -> bool:
        """new or disconnected -> connected; :class:`MachineError` from connected."""
        session = self._session
        if session.lifecycle_state == CONNECTED:
            raise MachineError(f"Can't trigger event connect from state {CONNECTED}!")
        session.lifecycle_state = CONNECTED
        session.last_connect_time = floor(time.time())
        session.last_disconnect_time = None
        return True

    def disconnect(self) -> bool:
        """Any state -> disconnected."""
        session = self._session
        session.lifecycle_state = DISCONNECTED
        session.last_disconnect_time = floor(time.time())
        return True

    def is_new(self) -> bool:
        """True before the first connect."""
        return self._session.lifecycle_state == NEW

    def is_connected(self) -> bool:
        """True while a connection uses the session."""
        return self._session.lifecycle_state == CONNECTED

    def is_disconnected(self) -> bool:
        """True once the session's connection ended (a persistent session waits here)."""
        return self._session.lifecycle_state == DISCONNECTED


class BrokerSession(Session):
    """amqtt's session with its life cycle in :attr:`lifecycle_state` (see the module docstring)."""

    lifecycle_state: str

    def _init_states(self) -> None:
        # Called by Session.__init__ instead of building a transitions.Machine.
        self.lifecycle_state = NEW

    @property
    def transitions(self) -> SessionStates:
        """The same calls amqtt makes on its per-session state machine."""
        return SessionStates(self)
