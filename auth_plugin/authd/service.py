"""The decisions behind every authd contract: logins, and topic checks for a per-request principal.

A broker that calls an HTTP auth service keeps the sessions; authd does not see them. A topic check
arrives with a username and a client id but no password, so the principal (what the ACL needs) is
re-derived from the registry and cached per client id. The credential change feed drops cached
principals whose credential changed, and may run a kicker to close the user's live connections on
the broker.
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
from auth_plugin.authenticator import DEVICE_USERNAME_PREFIX, Authenticator, ConnectAttempt
from auth_plugin.principals import Principal
from auth_plugin.revocation import Revoker
from provisioning.registry import ACTIVE_STATUSES, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry

logger = logging.getLogger(__name__)


class Kicker(Protocol):
    """Closes a user's live connections on the broker (optional)."""

    async def kick(self, username: str) -> bool:
        """True when the broker confirmed it."""
        ...


class PrincipalCache:
    """Principals by client id, bounded; also the ``LiveSessions`` the revoker walks."""

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

    def __init__(self, authenticator: Authenticator, metrics: Metrics, cache: PrincipalCache) -> None:
        self._authenticator = authenticator
        self.metrics = metrics
        self.cache = cache

    @property
    def authenticator(self) -> Authenticator:
        """The decisions behind every contract."""
        return self._authenticator

    async def login(self, contract: str, attempt: ConnectAttempt) -> Principal | None:
        """The principal for a CONNECT the broker asks about, or None (refused)."""
        username = attempt.username or None
        attempt = replace(attempt, username=username)
        decision = await self._authenticator.authenticate(attempt)
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
            return None
        self.cache.remember(username, attempt.client_id or "", decision.principal)
        return decision.principal

    async def principal(self, username: str | None, client_id: str | None) -> Principal | None:
        """The principal of an authenticated session, from the cache or the registry."""
        username = username or None
        key = client_id or ""
        cached = self.cache.get(username, key)
        if cached is not None:
            self.metrics.principal_cache_hits += 1
            return cached
        principal = await self._authenticator.principal_for(username, client_id)
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
    ) -> None:
        super().__init__(devices, accounts, authenticator.cache, cache, interval=interval)
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
