"""Follow the credential change feed: drop cached verifications, disconnect dead logins.

Every broker process runs one follower. It polls ``credential_changes`` by primary key every
``interval`` seconds; on PostgreSQL a NOTIFY sent in the changing transaction wakes it at once.
A session is disconnected when the credential it logged in with is no longer the current one
(reissued, rotated, reset, decommissioned, deleted, removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from auth_plugin.cache import VerifiedCache
from auth_plugin.principals import AccountPrincipal, DevicePrincipal, Principal, credential_tag
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import ACTIVE_STATUSES, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.transactions import CHANGES_CHANNEL, watch_changes

logger = logging.getLogger(__name__)


class LiveSessions(Protocol):
    """The broker's connected sessions and a way to end one."""

    def live_principals(self) -> Iterable[tuple[str, Principal]]:
        """``(client_id, principal)`` of every connected, authenticated session."""
        ...

    async def kick(self, client_id: str, reason: str) -> bool:
        """Disconnect one session without its will."""
        ...


class Revoker:
    """Applies credential changes to this process's cache and sessions."""

    def __init__(
        self,
        devices: DeviceRegistry,
        accounts: AccountRegistry,
        cache: VerifiedCache,
        sessions: LiveSessions,
        *,
        interval: float = 0.5,
    ) -> None:
        self._devices = devices
        self._accounts = accounts
        self._cache = cache
        self._sessions = sessions
        self._interval = interval
        self._wake = asyncio.Event()
        self._rechecks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.kicked = 0
        # Changes made by this process: drop the entries now, and read the feed now to kick.
        watch_changes(devices.engine, self._changed_here)

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stopping

    def request_stop(self) -> None:
        """Make :meth:`run` return after the round in progress (a query is never cut off)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Follow the feed until :meth:`request_stop` (or until cancelled)."""
        last = await self._devices.last_change_id()
        listener = await self._listen()
        unavailable = False
        try:
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                self._wake.clear()
                if self._stopping:
                    break
                try:
                    changes = await self._devices.changes_since(last)
                except RegistryUnavailableError as exc:
                    if not unavailable:
                        logger.warning("credential change feed unavailable, retrying: %s", exc)
                    unavailable = True
                    continue
                unavailable = False
                if changes:
                    last = changes[-1][0]
                    await self.apply({username for _, username, _ in changes})
        finally:
            for task in list(self._rechecks):
                task.cancel()
            if listener is not None:
                await listener.close()

    async def apply(self, usernames: set[str]) -> None:
        """Drop cache entries and end the sessions whose credential is no longer current."""
        for username in usernames:
            self._cache.drop(username)
        for client_id, principal in list(self._sessions.live_principals()):
            if _name_of(principal) not in usernames or await self._still_valid(principal):
                continue
            await self._kick(client_id, principal)

    def _changed_here(self, usernames: frozenset[str]) -> None:
        for username in usernames:
            self._cache.drop(username)
        self._wake.set()

    def confirm(self, client_id: str, principal: Principal) -> None:
        """A session just went live: re-check it if its credential was dropped after its login.

        A change applied between a login's check and its session joining the broker's table is
        not seen by :meth:`apply`; the dropped cache entry tells, and a registry read decides.
        """
        if isinstance(principal, DevicePrincipal | AccountPrincipal) and not self._cache.holds(
            _name_of(principal) or "", principal.tag
        ):
            task = asyncio.get_running_loop().create_task(
                self._recheck(client_id, principal), name=f"mqttprov-recheck-{client_id}"
            )
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    async def _recheck(self, client_id: str, principal: Principal) -> None:
        try:
            valid = await self._still_valid(principal)
        except RegistryUnavailableError as exc:
            logger.warning("could not re-check client=%r after a credential change: %s", client_id, exc)
            return
        if not valid:
            await self._kick(client_id, principal)

    async def _kick(self, client_id: str, principal: Principal) -> None:
        if await self._sessions.kick(client_id, "credentials revoked"):
            self.kicked += 1
            logger.info("revoked session client=%r username=%s", client_id, _name_of(principal))

    async def _still_valid(self, principal: Principal) -> bool:
        if isinstance(principal, DevicePrincipal):
            record = await self._devices.find_credentials_by_username(principal.username)
            return (
                record is not None
                and record.password_hash is not None
                and record.device.status in ACTIVE_STATUSES
                and credential_tag(record.password_hash) == principal.tag
            )
        if isinstance(principal, AccountPrincipal):
            account = await self._accounts.find(principal.name)
            return account is not None and credential_tag(account.password_hash) == principal.tag
        return True

    async def _listen(self) -> _Listener | None:
        """On PostgreSQL, LISTEN on the change channel so a NOTIFY wakes the follower at once."""
        engine = self._devices.engine
        if engine.dialect.name != "postgresql":
            return None
        conn: Any = None
        try:
            conn = await engine.connect()
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.add_listener(CHANGES_CHANNEL, self._notified)
        except Exception as exc:  # noqa: BLE001 - polling still works; say why LISTEN did not
            logger.warning("LISTEN on %s failed, polling only: %s", CHANGES_CHANNEL, exc)
            await _release(conn)
            return None
        except asyncio.CancelledError:
            # Stopped while starting: the connection goes back to the pool, not to the GC.
            await _release(conn)
            raise
        return _Listener(conn, driver, self._notified)

    def _notified(self, *_: object) -> None:
        self._wake.set()


def _name_of(principal: Principal) -> str | None:
    if isinstance(principal, DevicePrincipal):
        return principal.username
    if isinstance(principal, AccountPrincipal):
        return principal.name
    return None


async def _release(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()


class _Listener:
    """The connection held open for LISTEN, released on stop."""

    def __init__(self, conn: Any, driver: Any, callback: Any) -> None:
        self._conn = conn
        self._driver = driver
        self._callback = callback

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._driver.remove_listener(CHANGES_CHANNEL, self._callback)
        await self._conn.close()
