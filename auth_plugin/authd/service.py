"""The decisions behind every authd contract: logins, and topic checks for a per-request principal.

A broker that calls an HTTP auth service keeps the sessions; authd does not see them. A topic check
arrives with a username and a client id but no password, so the principal (what the ACL needs) is
re-derived from the registry and cached per client id. The credential change feed drops cached
principals whose credential changed, and may run a kicker to close the user's live connections on
the broker. Cached principals are answered only while that feed is being read (the verified
cache's bound, :attr:`VerifiedCache.fresh`); meanwhile topic checks go to the registry.

A request the registry cannot answer now raises :class:`UndecidedError`: each contract answers it
with its "not decided" (deny, or EMQX's ``ignore``), logged once per outage, never as a refusal.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Protocol

from auth_plugin.acl import Action
from auth_plugin.authd.metrics import Metrics
from auth_plugin.authd.policy import external_allows
from auth_plugin.authenticator import Authenticator, ConnectAttempt
from auth_plugin.errors import AuthError
from auth_plugin.principals import SERVER_UNAVAILABLE, Principal
from auth_plugin.revocation import Revoker
from provisioning.contract import DEVICE_USERNAME_PREFIX
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import ACTIVE_STATUSES, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.outage import OutageLog

logger = logging.getLogger(__name__)


# What an outage stops, as the first line of its story says (see OutageLog).
_AFFECTED = "authd: logins and topic checks not decided, answered deny (EMQX logins: ignore)"


class UndecidedError(AuthError):
    """No decision now: the registry is unavailable, or a login was not decided in time.

    Already logged; the guard counts it and answers the contract's "not decided"
    (``Route.undecided``).
    """


class Kicker(Protocol):
    """Closes a user's live connections on the broker (optional)."""

    async def kick(self, username: str) -> bool:
        """True when the broker confirmed it."""
        ...


class PrincipalCache:
    """Principals by client id, bounded; also the ``LiveSessions`` the revoker walks.

    Kept current by the change feed, like the verified cache, and trusted as long as it is:
    :meth:`AuthdService.principal` asks it only while ``authenticator.cache.fresh``.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[str, tuple[str | None, Principal]] = OrderedDict()
        self.max_entries = max_entries
        self.revoked: set[str] = set()

    def get(self, username: str | None, client_id: str) -> Principal | None:
        """The cached principal of this session, if the username matches."""
        entry = self._entries.get(client_id)
        if entry is None or entry[0] != username:
            return None
        self._entries.move_to_end(client_id)
        return entry[1]

    def remember(self, username: str | None, client_id: str, principal: Principal) -> None:
        """Cache a principal derived from the registry."""
        self._entries[client_id] = (username, principal)
        self._entries.move_to_end(client_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def live_principals(self) -> Iterable[tuple[str, Principal]]:
        """Every cached ``(client_id, principal)``."""
        return [(client_id, principal) for client_id, (_, principal) in self._entries.items()]

    async def kick(self, client_id: str, reason: str) -> bool:  # noqa: ARG002 - LiveSessions protocol
        """Forget a revoked principal; its user is kicked once per batch by :class:`AuthdRevoker`."""
        entry = self._entries.pop(client_id, None)
        if entry is None:
            return False
        if entry[0] is not None:
            self.revoked.add(entry[0])
        return True

    def __len__(self) -> int:
        return len(self._entries)


class AuthdService:
    """What every contract module calls: a login, or a topic check."""

    def __init__(
        self,
        authenticator: Authenticator,
        metrics: Metrics,
        cache: PrincipalCache,
        *,
        outage: OutageLog | None = None,
    ) -> None:
        self._authenticator = authenticator
        self.metrics = metrics
        self.cache = cache
        #: The database's outage story; shared with the follower, whose good rounds end it.
        self.outage = outage or OutageLog(logger)

    @property
    def authenticator(self) -> Authenticator:
        """The decisions behind every contract."""
        return self._authenticator

    async def login(self, contract: str, attempt: ConnectAttempt) -> Principal | None:
        """The principal for a CONNECT the broker asks about, or None (refused).

        Raises :class:`UndecidedError` when it cannot be decided now.
        """
        username = attempt.username or None
        attempt = replace(attempt, username=username)
        try:
            decision = await self._authenticator.authenticate(attempt)
        except RegistryUnavailableError as exc:
            raise self._undecided(exc) from exc
        undecided = decision.code == SERVER_UNAVAILABLE  # not in time: no verdict on the password
        if not undecided:
            self.metrics.login(contract, accepted=decision.accepted)
        if decision.principal is None:
            logger.info(
                "%s login refused client=%r username=%r address=%s: %s",
                contract,
                attempt.client_id,
                username,
                attempt.address,
                decision.reason,
            )
            if undecided:
                raise UndecidedError(decision.reason)
            return None
        self.cache.remember(username, attempt.client_id or "", decision.principal)
        return decision.principal

    async def principal(self, username: str | None, client_id: str | None) -> Principal | None:
        """The principal of an authenticated session, from the cache while the change feed is
        read, else from the registry. Raises :class:`UndecidedError` when it cannot be read."""
        username = username or None
        key = client_id or ""
        # The same follower drops changed entries from both caches: when it cannot read the
        # feed, a principal revoked meanwhile could still be here.
        if self._authenticator.cache.fresh:
            cached = self.cache.get(username, key)
            if cached is not None:
                self.metrics.principal_cache_hits += 1
                return cached
        try:
            principal = await self._authenticator.principal_for(username, client_id)
        except RegistryUnavailableError as exc:
            raise self._undecided(exc) from exc
        if principal is not None:
            self.cache.remember(username, key, principal)
        return principal

    async def allowed(
        self, contract: str, *, username: str | None, client_id: str | None, topic: str, action: Action
    ) -> bool:
        """True when this session may ``action`` on ``topic`` (a filter for SUBSCRIBE)."""
        principal = await self.principal(username, client_id)
        decision = external_allows(principal, topic, action)
        self.metrics.check(contract, allowed=decision)
        if not decision:
            logger.info(
                "%s %s refused client=%r username=%r topic=%r",
                contract,
                action.value,
                client_id,
                username,
                topic,
            )
        return decision

    def _undecided(self, exc: RegistryUnavailableError) -> UndecidedError:
        # Routine while the database is away: one story per outage, no line per request.
        self.outage.failed(_AFFECTED, exc)
        return UndecidedError(str(exc))


class AuthdRevoker(Revoker):
    """The change-feed follower of authd: drop cached principals, then kick each revoked user once."""

    def __init__(
        self,
        devices: DeviceRegistry,
        accounts: AccountRegistry,
        authenticator: Authenticator,
        cache: PrincipalCache,
        kicker: Kicker | None,
        *,
        interval: float,
        outage: OutageLog | None = None,
    ) -> None:
        super().__init__(devices, accounts, authenticator.cache, cache, interval=interval, outage=outage)
        self._registry = devices
        self._account_registry = accounts
        self._principals = cache
        self._kicker = kicker

    async def apply(self, usernames: set[str]) -> None:
        """Drop what changed; close the live connections of users whose login is no longer valid."""
        self._principals.revoked.clear()
        await super().apply(usernames)
        revoked = set(self._principals.revoked)
        for username in usernames - revoked:
            # Not seen by this process (another authd served it): kick it when it is gone for good.
            if await self._gone(username):
                revoked.add(username)
        if self._kicker is not None and revoked:
            kicker = self._kicker
            await asyncio.gather(*(kicker.kick(name) for name in sorted(revoked)))

    async def _gone(self, username: str) -> bool:
        if username.startswith(DEVICE_USERNAME_PREFIX):
            record = await self._registry.find_credentials_by_username(username)
            return (
                record is None or record.password_hash is None or record.device.status not in ACTIVE_STATUSES
            )
        return await self._account_registry.find(username) is None
