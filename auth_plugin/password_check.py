"""A password against a registered credential: the cache, the stored verifier, else bcrypt."""

from __future__ import annotations

import logging
import secrets
from contextvars import ContextVar

import bcrypt

from auth_plugin.budget import BcryptBudget
from auth_plugin.cache import VerifiedCache
from auth_plugin.credentials import Credential
from auth_plugin.decisions import AuthStats, Check, ConnectAttempt, Decision
from auth_plugin.principals import BAD_USERNAME_OR_PASSWORD, SERVER_UNAVAILABLE
from auth_plugin.throttle import LoginThrottle
from auth_plugin.verifiers import VerifierKey
from auth_plugin.writes import BackgroundWrites
from provisioning.registry.verifiers import StoredVerifier

__all__ = ["LOGIN_DEADLINE", "UNKNOWN_SOURCE", "PasswordCheck", "unmatchable_hash"]

logger = logging.getLogger(__name__)

#: When the decision under way must be made by (the event loop's clock), per task.
LOGIN_DEADLINE: ContextVar[float | None] = ContextVar("mqttprov_login_deadline", default=None)
#: The budget's source for checks of usernames that are not registered: one share for all of them.
UNKNOWN_SOURCE = "unknown usernames"
# bcrypt's own base-64 alphabet and the length of the digest after the 29-character salt.
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_DIGEST_CHARS = 31


class PasswordCheck:
    """Check passwords for the authenticator, each at the least cost that keeps it a real check."""

    def __init__(
        self,
        *,
        cache: VerifiedCache,
        verifier_key: VerifierKey | None,
        throttle: LoginThrottle,
        budget: BcryptBudget,
        stats: AuthStats,
        writes: BackgroundWrites,
        cost: int,
    ) -> None:
        self._cache = cache
        self._key = verifier_key
        self._throttle = throttle
        self._budget = budget
        self._stats = stats
        self._writes = writes
        self._dummy_hash = unmatchable_hash(cost)
        self._dummy_verifier = StoredVerifier("", "", secrets.token_hex(32))
        self._foreign_key_warned = False

    async def check(
        self, attempt: ConnectAttempt, username: str, credential: Credential, since: int
    ) -> Check:
        """Check the password against the credential: the cache, its verifier, else bcrypt."""
        stored_hash, tag = credential.stored_hash, credential.tag
        password = attempt.password or ""
        if self._cache.verified(username, tag, password):
            self._stats.cache_hits += 1
            return Check.VERIFIED
        key = self._key
        stored = credential.own_verifier()
        if key is not None and stored is not None:
            if stored.key_id == key.key_id:
                self._stats.verifier_checks += 1
                if not key.matches(stored, username, stored_hash, password):
                    return Check.WRONG
                self._cache.remember(username, tag, password, since=since)
                return Check.VERIFIED
            self._foreign_key_seen(username)
        if not self._throttle.begin_check(username, attempt.address):
            return Check.LOCKED
        try:
            verified = await self._budget.verify(
                attempt.address or f"username {username}",
                password,
                stored_hash,
                deadline=LOGIN_DEADLINE.get(),
            )
        finally:
            self._throttle.end_check(username, attempt.address)
        if verified is None:
            self._stats.overload_refusals += 1
            return Check.BUSY
        self._stats.bcrypt_checks += 1
        if not verified:
            return Check.WRONG
        self._cache.remember(username, tag, password, since=since)
        if key is not None:
            self._writes.keep_verifier(username, stored_hash, key.make(username, stored_hash, tag, password))
        return Check.VERIFIED

    async def unknown(self, attempt: ConnectAttempt, reason: str) -> Decision:
        """Refuse a username with no credential at the cost of checking one that has a verifier."""
        password = attempt.password or ""
        if self._key is not None:
            # The same work as a verifier check, so timing does not tell which usernames exist.
            self._key.matches(self._dummy_verifier, attempt.username or "", self._dummy_hash, password)
        elif (
            await self._budget.verify(
                UNKNOWN_SOURCE, password, self._dummy_hash, deadline=LOGIN_DEADLINE.get()
            )
            is None
        ):
            self._stats.overload_refusals += 1
            return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)
        return Decision(None, reason, BAD_USERNAME_OR_PASSWORD)

    def _foreign_key_seen(self, username: str) -> None:
        if not self._foreign_key_warned:
            self._foreign_key_warned = True
            logger.warning(
                "the verifier of %s was made under another key: every process on this registry must use "
                "the same [auth] verifier_key; checking with bcrypt and storing a verifier under this key",
                username,
            )


def unmatchable_hash(cost: int) -> str:
    """A well-formed bcrypt hash at ``cost`` that no password matches, made without hashing.

    Checking a password against it costs exactly one bcrypt run at ``cost``, as a real check
    does. Hashing a dummy password on first use instead made the first unknown-username login
    of a process cost two runs (a hash, then the check), and told that the name was unknown.
    """
    salt = bcrypt.gensalt(rounds=cost).decode("ascii")
    return salt + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(_BCRYPT_DIGEST_CHARS))
