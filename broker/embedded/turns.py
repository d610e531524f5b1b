"""One authenticated CONNECT at a time per client id, from take-over until its message loop runs.

amqtt's session table is read at take-over and written later, with awaits in between. Several
CONNECTs for one client id arriving together (a device reconnecting from several threads, an
attacker with the right password) each ended the same old connection, and each later one deleted
the table entry the one before had just written: that connection stayed open, "connected", and
out of reach of kick and revocation. Ending a connection whose message loop has not started
yet hangs instead, so the next CONNECT waits its turn until the previous one is fully running.
"""

from __future__ import annotations

import asyncio
from typing import Any

_HOLDS_TURN = "mqttprov.holds_turn"


class ClientIdTurns:
    """A lock per client id, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def take(self, client_id: str, session: Any) -> None:
        """Wait for the client id's turn; the session remembers that it holds it."""
        lock, users = self._locks.get(client_id, (asyncio.Lock(), 0))
        self._locks[client_id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(client_id)
            raise
        session.attributes[_HOLDS_TURN] = client_id

    def give_back(self, session: Any) -> None:
        """End the session's turn, if it holds one (safe to call more than once)."""
        client_id = session.attributes.pop(_HOLDS_TURN, None)
        if client_id is None:
            return
        lock, _ = self._locks[client_id]
        lock.release()
        self._leave(client_id)

    def _leave(self, client_id: str) -> None:
        lock, users = self._locks[client_id]
        if users <= 1:
            del self._locks[client_id]
        else:
            self._locks[client_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
