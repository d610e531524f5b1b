"""Verified-credential cache: a reconnect costs an HMAC instead of a bcrypt check.

After one successful bcrypt check, the entry for a username holds the credential's tag and an
HMAC of the password under a key that is random per process and never stored. An entry only
matches while the stored hash is the one it was verified against, so a changed, reset or
decommissioned credential can never be accepted from the cache; the change feed also drops
entries as soon as it sees a change. Plaintext passwords are never held.

Once a login has been fully accepted, the entry also holds the session's principal: a warm
reconnect is then answered without a registry read, and the change feed (which drops the entry)
is what keeps that answer current.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from auth_plugin.principals import Principal


@dataclass(slots=True)
class _Entry:
    tag: str
    digest: bytes
    principal: Principal | None = None


class VerifiedCache:
    """Bounded LRU map username -> (credential tag, keyed password digest, principal)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.max_entries = max_entries

    def _digest(self, username: str, tag: str, password: str) -> bytes:
        material = "\x00".join((username, tag, password)).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def _matching(self, username: str, password: str, tag: str | None = None) -> _Entry | None:
        entry = self._entries.get(username)
        if entry is None or (tag is not None and entry.tag != tag):
            return None
        if not hmac.compare_digest(entry.digest, self._digest(username, entry.tag, password)):
            return None
        self._entries.move_to_end(username)
        return entry

    def verified(self, username: str, tag: str, password: str) -> bool:
        """True when this exact (username, password) was verified against this credential."""
        return self._matching(username, password, tag) is not None

    def principal(self, username: str, password: str) -> Principal | None:
        """The principal of an accepted login with this exact (username, password), if cached."""
        entry = self._matching(username, password)
        return None if entry is None else entry.principal

    def remember(self, username: str, tag: str, password: str) -> None:
        """Record a successful bcrypt check."""
        self._entries[username] = _Entry(tag, self._digest(username, tag, password))
        self._entries.move_to_end(username)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def accept(self, username: str, tag: str, principal: Principal) -> None:
        """Attach the principal of an accepted login to the entry of the credential it used."""
        entry = self._entries.get(username)
        if entry is not None and entry.tag == tag:
            entry.principal = principal

    def holds(self, username: str, tag: str) -> bool:
        """True while the credential with this tag has not been dropped since it was verified."""
        entry = self._entries.get(username)
        return entry is not None and entry.tag == tag

    def drop(self, username: str) -> None:
        """Forget a username (its credential changed)."""
        self._entries.pop(username, None)

    def __len__(self) -> int:
        return len(self._entries)
