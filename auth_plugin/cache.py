"""Verified-credential cache: a reconnect costs an HMAC instead of a bcrypt check.

After one successful bcrypt check, the entry for a username holds the credential's tag and an
HMAC of the password under a key that is random per process and never stored. An entry only
matches while the stored hash is the one it was verified against, so a changed, reset or
decommissioned credential can never be accepted from the cache; the change feed also drops
entries as soon as it sees a change. Plaintext passwords are never held.

At start, a process may also load entries made from the verifiers stored in the registry
(:meth:`VerifiedCache.preload`): their digest is the stored one, checked with the server's
verifier key over the stored hash, so the fleet's first logins after a restart need no
registry read either.

Once a login has been fully accepted, the entry also holds the session's principal: a warm
reconnect is then answered without a registry read, and the change feed (which drops the entry)
is what keeps that answer current. So that answer is only given while the feed is being read:
once a follower is bound to the cache (:meth:`VerifiedCache.bind_to_feed`), principals are only
answered within ``window`` seconds of its last successful read; later logins go to the registry.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from auth_plugin.principals import Principal

if TYPE_CHECKING:
    from auth_plugin.verifiers import VerifierKey


@dataclass(slots=True)
class _Entry:
    tag: str
    digest: bytes
    principal: Principal | None = None
    #: Set for an entry loaded from a stored verifier: ``digest`` is that verifier (hex), made
    #: with the server's key over this hash.
    stored_hash: str | None = None


class VerifiedCache:
    """Bounded LRU map username -> (credential tag, keyed password digest, principal)."""

    def __init__(
        self,
        max_entries: int = 200_000,
        *,
        clock: Callable[[], float] = time.monotonic,
        verifier_key: VerifierKey | None = None,
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._verifier_key = verifier_key
        # A count of drops and clears, and when each username was last dropped (bounded): a
        # login that read the registry before a drop must not put its entry back after it.
        self._generation = 0
        self._cleared_at = 0
        self._dropped: OrderedDict[str, int] = OrderedDict()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.max_entries = max_entries
        self._clock = clock
        # Unbound (no follower): only this process's own changes can drop entries, and they do.
        self._window = math.inf
        self._fresh_until = math.inf

    def bind_to_feed(self, window: float) -> None:
        """A change-feed follower keeps this cache current: from now on, principals are answered
        only within ``window`` seconds of its last :meth:`feed_read`.

        Binding again (a follower restarted) changes the window but grants no fresh trust.
        """
        bound = math.isfinite(self._window)
        self._window = window
        if not bound:
            self.feed_read()

    def feed_read(self) -> None:
        """The follower has read the feed and applied what it found."""
        self._fresh_until = self._clock() + self._window

    @property
    def fresh(self) -> bool:
        """False once the feed has not been read for longer than the window: an entry may then
        outlive a revocation this process has not seen."""
        return self._clock() < self._fresh_until

    def _digest(self, username: str, tag: str, password: str) -> bytes:
        material = "\x00".join((username, tag, password)).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def _matching(self, username: str, password: str, tag: str | None = None) -> _Entry | None:
        entry = self._entries.get(username)
        if entry is None or (tag is not None and entry.tag != tag):
            return None
        if entry.stored_hash is None:
            expected = self._digest(username, entry.tag, password)
        elif self._verifier_key is not None:
            expected = self._verifier_key.digest(username, entry.stored_hash, password).encode("ascii")
        else:  # pragma: no cover - preload() refuses entries without a key
            return None
        if not hmac.compare_digest(entry.digest, expected):
            return None
        self._entries.move_to_end(username)
        return entry

    def verified(self, username: str, tag: str, password: str) -> bool:
        """True when this exact (username, password) was verified against this credential.

        Not bounded by :attr:`fresh`: ``tag`` comes from the registry read the caller just made,
        so a stale entry cannot match it (and a lagging feed does not cost a bcrypt per login).
        """
        return self._matching(username, password, tag) is not None

    def principal(self, username: str, password: str) -> Principal | None:
        """The principal of an accepted login with this exact (username, password), if cached
        and the change feed has been read recently enough to vouch for it (see :attr:`fresh`)."""
        if not self.fresh:
            return None
        entry = self._matching(username, password)
        return None if entry is None else entry.principal

    def mark(self) -> int:
        """Where the cache stands now: give it to :meth:`remember` after reading the registry."""
        return self._generation

    def _dropped_since(self, username: str, since: int | None) -> bool:
        if since is None:
            return False
        return self._cleared_at > since or self._dropped.get(username, -1) > since

    def remember(self, username: str, tag: str, password: str, *, since: int | None = None) -> None:
        """Record a successful check of a credential read from the registry after :meth:`mark`
        returned ``since``; nothing when the username was dropped since (the credential read
        may already be revoked: the session is then checked against the registry again)."""
        if self._dropped_since(username, since):
            return
        self._entries[username] = _Entry(tag, self._digest(username, tag, password))
        self._entries.move_to_end(username)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def preload(
        self,
        username: str,
        password_hash: str,
        tag: str,
        digest: str,
        principal: Principal,
        *,
        since: int | None = None,
    ) -> bool:
        """Add the entry of a credential from its stored verifier (``digest``, made with this
        cache's verifier key over ``password_hash``), read after :meth:`mark` returned ``since``;
        an entry already there is kept. False when the cache has no verifier key or no room left,
        or the username was dropped since."""
        if (
            self._verifier_key is None
            or username in self._entries
            or len(self._entries) >= self.max_entries
            or self._dropped_since(username, since)
        ):
            return False
        self._entries[username] = _Entry(tag, digest.encode("ascii"), principal, password_hash)
        self._entries.move_to_end(username, last=False)  # the oldest: the first to go for room
        return True

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
        self._generation += 1
        self._dropped.pop(username, None)
        self._dropped[username] = self._generation
        while len(self._dropped) > self.max_entries:
            self._dropped.popitem(last=False)

    def clear(self) -> None:
        """Forget every username (what changed since they were verified is not known)."""
        self._entries.clear()
        self._generation += 1
        self._cleared_at = self._generation

    def __len__(self) -> int:
        return len(self._entries)
