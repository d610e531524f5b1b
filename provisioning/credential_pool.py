"""Credentials made ahead of an enrolment burst: password and bcrypt hash, in memory only.

The fill loop hashes only while the bcrypt workers have nothing else to do
(:meth:`PasswordHasher.hash_when_idle`), so logins and issue-time hashes never wait for more than
the one fill hash already running. A credential is taken at most once; the unused ones die with
the process. Nothing here is written, logged or shown: see docs/security/credential-pool.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from provisioning.passwords import PasswordHasher, generate_password

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, repr=False)
class PooledCredential:
    """A generated password and its bcrypt hash; its ``repr`` shows neither."""

    password: str
    password_hash: str

    def __repr__(self) -> str:
        return "PooledCredential(password=***, password_hash=***)"


class CredentialPool:
    """Up to ``size`` ready credentials, filled by :meth:`run` from idle bcrypt time (0: off)."""

    def __init__(self, hasher: PasswordHasher, size: int) -> None:
        self._hasher = hasher
        self.size = size
        self._ready: deque[PooledCredential] = deque()
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._full = asyncio.Event()
        self._running = False
        #: Credentials handed out by :meth:`take` (each one once).
        self.taken = 0

    def __repr__(self) -> str:
        return f"CredentialPool(size={self.size}, ready={len(self._ready)})"

    @property
    def ready(self) -> int:
        """How many credentials are ready now."""
        return len(self._ready)

    def take(self) -> PooledCredential | None:
        """A ready credential, removed from the pool for good; None when none is ready."""
        if not self._ready:
            return None
        credential = self._ready.popleft()
        self.taken += 1
        self._full.clear()
        self._room.set()
        return credential

    async def wait_full(self) -> None:
        """Return once the pool holds ``size`` credentials (at once when it is off)."""
        if self.size and len(self._ready) < self.size:
            await self._full.wait()

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Make :meth:`run` return: a wait for idle bcrypt time is abandoned, not finished."""
        self._stop.set()
        self._room.set()

    async def run(self) -> None:
        """Keep the pool full until :meth:`request_stop`, then drop the unused credentials.

        With the pool off it only waits to be stopped. An unexpected error is logged and ends the
        filling (provisioning then hashes at issue, as without a pool), not the loop.
        """
        if self._running:
            raise RuntimeError("the credential pool is already being filled")
        self._running = True
        try:
            if self.size:
                await self._fill()
            await self._stop.wait()
        finally:
            self._ready.clear()
            self._full.clear()
            self._running = False

    async def _fill(self) -> None:
        announced = False
        try:
            while not self.stopping:
                if len(self._ready) >= self.size:
                    self._room.clear()
                    await self._room.wait()
                    continue
                credential = await self._make_one()
                if credential is None:
                    return
                self._ready.append(credential)
                if len(self._ready) >= self.size:
                    self._full.set()
                    if not announced:
                        logger.info("credential pool full: %d credentials ready", self.size)
                        announced = True
        except Exception:
            logger.exception("credential pool no longer filled after an unexpected error; hashing at issue")

    async def _make_one(self) -> PooledCredential | None:
        """One new credential hashed in idle time, or None when asked to stop first."""
        password = generate_password()
        hashing = asyncio.create_task(
            self._hasher.hash_when_idle(password), name="mqttprov-credential-pool-hash"
        )
        stopping = asyncio.create_task(self._stop.wait(), name="mqttprov-credential-pool-stop")
        try:
            await asyncio.wait({hashing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hashing.cancel()
            stopping.cancel()
            await asyncio.gather(hashing, stopping, return_exceptions=True)
        # A hash that ended (or failed) counts even when the stop came in the same turn of the
        # loop: a failure must be logged, not lost to the stop (seen on Python 3.12).
        if hashing.done() and not hashing.cancelled():
            return PooledCredential(password, hashing.result())
        return None
