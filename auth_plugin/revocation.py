"""Follow the credential change feed: drop cached verifications, disconnect dead logins.

Every broker process runs one follower. It polls ``credential_changes`` by primary key every
``interval`` seconds; on PostgreSQL a NOTIFY sent in the changing transaction wakes it at once.
A session is disconnected when the credential it logged in with is no longer the current one
(reissued, rotated, reset, decommissioned, deleted, removed), and where the broker keeps retained
messages (:class:`RetainedMessages`), those such a credential published are cleared: a device that
is gone has no session for the follower to see, but its retained state would reach new subscribers.

While the feed cannot be read, the verified cache stops vouching for its principals after
``trust_window`` seconds (see :class:`VerifiedCache`): a device revoked meanwhile by another
process cannot log in from this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Iterable
from typing import Any, Protocol, runtime_checkable

from sqlalchemy.exc import SQLAlchemyError

from auth_plugin.cache import VerifiedCache
from auth_plugin.principals import AccountPrincipal, DevicePrincipal, Principal, credential_tag
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import ACTIVE_STATUSES, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.feed import ChangeFeed
from provisioning.registry.outage import OutageLog
from provisioning.registry.transactions import CHANGES_CHANNEL, watch_changes

logger = logging.getLogger(__name__)

#: The cache vouches for its principals this many poll intervals after the last good round ...
TRUST_INTERVALS = 4
#: ... and at least this many seconds (a busy loop must not turn every warm login cold).
MIN_TRUST_SECONDS = 2.0
#: Seconds before trying LISTEN again after it failed on a healthy database.
LISTEN_RETRY_SECONDS = 30.0
#: Seconds given to UNLISTEN and the release of its connection before the connection is dropped.
LISTEN_CLOSE_SECONDS = 2.0


class LiveSessions(Protocol):
    """The broker's connected sessions and a way to end one."""

    def live_principals(self) -> Iterable[tuple[str, Principal]]:
        """``(client_id, principal)`` of every connected, authenticated session."""
        ...

    async def kick(self, client_id: str, reason: str) -> bool:
        """Disconnect one session without its will."""
        ...


@runtime_checkable
class RetainedMessages(Protocol):
    """A broker's retained messages by publisher; offered by the sessions object if it has them.

    Optional: authd's brokers keep their own retained messages, out of our reach.
    """

    def retained_publishers(self, names: Collection[str]) -> Iterable[Principal]:
        """The principals named ``names`` (usernames, account names) with retained messages."""
        ...

    async def retire(self, principal: Principal) -> int:
        """Clear the retained messages ``principal`` (this credential) published; how many."""
        ...


class Revoker:
    """Applies credential changes to this process's cache and sessions.

    :meth:`run` survives every failure of the database: a round that fails is retried, and the
    position in the feed only moves past changes that were applied (cache entries dropped,
    sessions re-checked and kicked), so a change is never skipped.
    """

    def __init__(
        self,
        devices: DeviceRegistry,
        accounts: AccountRegistry,
        cache: VerifiedCache,
        sessions: LiveSessions,
        *,
        interval: float = 0.5,
        outage: OutageLog | None = None,
    ) -> None:
        self._devices = devices
        self._accounts = accounts
        self._cache = cache
        self._sessions = sessions
        self._retained = sessions if isinstance(sessions, RetainedMessages) else None
        self._interval = interval
        self._outage = outage or OutageLog(logger)
        self._wake = asyncio.Event()
        self._rechecks: set[asyncio.Task[None]] = set()
        # Sessions whose re-check after going live failed: re-checked by the next good round.
        self._pending: dict[str, Principal] = {}
        self._stopping = False
        # Kept across restarts of :meth:`run`: a restarted follower resumes, it does not skip.
        self._feed = ChangeFeed(devices)
        self._listener: _Listener | None = None
        self._listen_retry_at = 0.0
        self.kicked = 0
        #: When the feed was last read and applied (``time.monotonic``; the creation time until
        #: then): the change-feed lag a metric reports is the time since.
        self.read_at = time.monotonic()
        #: LISTEN connections opened (more than one: re-established after a lost connection).
        self.listens_opened = 0
        #: Seconds the cache vouches for its principals after a good round (see VerifiedCache.fresh).
        self.trust_window = max(TRUST_INTERVALS * interval, MIN_TRUST_SECONDS)
        # Changes made by this process: drop the entries now, and read the feed now to kick.
        watch_changes(devices.engine, self._changed_here)

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stopping

    @property
    def position(self) -> int | None:
        """The id of the newest change applied (None until the feed could first be read)."""
        return self._feed.position

    async def begin(self) -> None:
        """Start following from the feed's newest change, before any login is answered.

        Raises :class:`RegistryUnavailableError`; then :meth:`run` takes the position itself
        and, not knowing what changed before it, forgets every cached verification.
        """
        await self._feed.start()

    def request_stop(self) -> None:
        """Make :meth:`run` return after the round in progress (a query is never cut off)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Follow the feed until :meth:`request_stop` (or until cancelled)."""
        self._cache.bind_to_feed(self.trust_window)
        try:
            first = True  # the first round at once: it opens the LISTEN too
            while not self._stopping:
                if not first:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._interval)
                    self._wake.clear()
                    if self._stopping:
                        break
                first = False
                if await self._round():
                    await self._keep_listening()
        finally:
            if self._stopping:
                for task in list(self._rechecks):
                    task.cancel()
                await self._stop_listening()

    async def _round(self) -> bool:
        """Read the feed once and apply it; False when the database failed (retried next round)."""
        try:
            if self._feed.position is None:
                await self._feed.start()
                # Logins cached before the position was known may predate a revocation.
                self._cache.clear()
            await self._feed.read(self.apply)
            await self._recheck_pending()
        except (RegistryUnavailableError, SQLAlchemyError, OSError) as exc:
            self._outage.failed("change feed: revocations wait, cached logins go to the registry", exc)
            return False
        self._cache.feed_read()
        self.read_at = time.monotonic()
        self._outage.succeeded()
        return True

    async def apply(self, usernames: set[str]) -> None:
        """Drop cache entries, end the sessions whose credential is no longer current, and clear
        the retained messages such a credential published (reissue and rotate included: the
        broker cannot tell a compromised credential's messages from the device's own).

        Raises :class:`RegistryUnavailableError` when a session could not be re-checked: the
        caller applies the same changes again later (dropping and kicking twice is harmless).
        """
        for username in usernames:
            self._cache.drop(username)
        for client_id, principal in list(self._sessions.live_principals()):
            if _name_of(principal) not in usernames or await self._still_valid(principal):
                continue
            await self._kick(client_id, principal)
        if self._retained is not None:
            for principal in list(self._retained.retained_publishers(usernames)):
                if not await self._still_valid(principal):
                    await self._retained.retire(principal)

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
        except (RegistryUnavailableError, SQLAlchemyError, OSError):
            # Not dropped: the follower's next good round checks it again.
            self._pending[client_id] = principal
            return
        if not valid:
            await self._revoke_late(client_id, principal)

    async def _recheck_pending(self) -> None:
        if not self._pending:
            return
        live = dict(self._sessions.live_principals())
        for client_id, principal in list(self._pending.items()):
            # The same session only: its client may have reconnected with a valid credential since.
            if live.get(client_id) == principal and not await self._still_valid(principal):
                await self._revoke_late(client_id, principal)
            del self._pending[client_id]

    async def _revoke_late(self, client_id: str, principal: Principal) -> None:
        """A session that went live on a credential already revoked: end it, and clear what it
        may have retained since the round that cleared the rest."""
        await self._kick(client_id, principal)
        if self._retained is not None:
            await self._retained.retire(principal)

    async def _kick(self, client_id: str, principal: Principal) -> None:
        # The registry was read since ``principal`` was seen under ``client_id``: a new login (a
        # reissued credential, say) may hold that client id now, and must not be thrown off.
        if not any(cid == client_id and held is principal for cid, held in self._sessions.live_principals()):
            return
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

    async def _keep_listening(self) -> None:
        """On PostgreSQL, hold a LISTEN so a NOTIFY wakes the follower at once; open it again
        after its connection was lost (polling covers the gap, and is the fallback)."""
        if self._devices.engine.dialect.name != "postgresql":
            return
        if self._listener is not None:
            if self._listener.alive:
                return
            await self._stop_listening()
        loop = asyncio.get_running_loop()
        if loop.time() < self._listen_retry_at:
            return
        self._listener = await self._listen()
        if self._listener is None:
            self._listen_retry_at = loop.time() + LISTEN_RETRY_SECONDS
            return
        self.listens_opened += 1
        if self.listens_opened > 1:
            logger.info("LISTEN on %s re-established after a lost connection", CHANGES_CHANNEL)

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    async def _listen(self) -> _Listener | None:
        engine = self._devices.engine
        conn: Any = None
        try:
            conn = await engine.connect()
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.add_listener(CHANGES_CHANNEL, self._notified)
            # A lost connection wakes the follower, whose next good round listens again.
            driver.add_termination_listener(self._notified)
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
    """The connection held open for LISTEN, released on stop or once lost."""

    def __init__(self, conn: Any, driver: Any, callback: Any) -> None:
        self._conn = conn
        self._driver = driver
        self._callback = callback

    @property
    def alive(self) -> bool:
        """False once the connection was lost (the server restarted, the link was cut)."""
        return not self._driver.is_closed()

    async def close(self) -> None:
        if self.alive:
            with contextlib.suppress(Exception):
                self._driver.remove_termination_listener(self._callback)
                # Bounded: on a stalled link UNLISTEN and the pool's reset would wait for ever.
                await asyncio.wait_for(self._unlisten_and_release(), LISTEN_CLOSE_SECONDS)
                return
        # Lost or stalled: nothing to UNLISTEN on, and a pool reset would fail; drop it.
        with contextlib.suppress(Exception):
            await self._conn.invalidate()
        await _release(self._conn)

    async def _unlisten_and_release(self) -> None:
        await self._driver.remove_listener(CHANGES_CHANNEL, self._callback)
        await self._conn.close()
