"""Verified-credential cache: a reconnect costs an HMAC instead of a bcrypt check.

After one successful bcrypt check, the entry for a username holds the credential's tag and an
HMAC of the password under a key that is random per process and never stored. An entry only
matches while the stored hash is the one it was verified against, so a changed, reset or
decommissioned credential can never be accepted from the cache; the change feed also drops
entries as soon as it sees a change. Plaintext passwords are never held.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict


class VerifiedCache:
    """Bounded LRU map username -> (credential tag, keyed password digest)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self.max_entries = max_entries

    def _digest(self, username: str, tag: str, password: str) -> bytes:
        material = "\x00".join((username, tag, password)).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def verified(self, username: str, tag: str, password: str) -> bool:
        """True when this exact (username, password) was verified against this credential."""
        entry = self._entries.get(username)
        if entry is None or entry[0] != tag:
            return False
        if not hmac.compare_digest(entry[1], self._digest(username, tag, password)):
            return False
        self._entries.move_to_end(username)
        return True

    def remember(self, username: str, tag: str, password: str) -> None:
        """Record a successful bcrypt check."""
        self._entries[username] = (tag, self._digest(username, tag, password))
        self._entries.move_to_end(username)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, username: str) -> None:
        """Forget a username (its credential changed)."""
        self._entries.pop(username, None)

    def __len__(self) -> int:
        return len(self._entries)
