"""Presence behind the broker: connects and disconnects are coalesced and written in batches.

A reconnect storm must not become thousands of single-row commits: the recorder keeps the
latest state per device and writes it every ``interval`` seconds in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from sqlalchemy.exc import SQLAlchemyError

from provisioning.errors import RegistryUnavailableError
from provisioning.registry.models import utcnow
from provisioning.registry.outage import OutageLog
from provisioning.registry.presence import Presence, PresenceStore

logger = logging.getLogger(__name__)


class PresenceRecorder:
    """Collect presence in memory; :meth:`run` writes it behind."""

    def __init__(
        self, store: PresenceStore, *, interval: float = 0.5, outage: OutageLog | None = None
    ) -> None:
        self._store = store
        self._outage = outage or OutageLog(logger)
        self.interval = interval
        self._latest: dict[uuid.UUID, Presence] = {}
        self._logins: dict[uuid.UUID, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.batches_written = 0

    def online(self, device_id: uuid.UUID) -> None:
        """The device logged in."""
        self._latest[device_id] = Presence(online=True, at=utcnow())
        self._logins[device_id] = self._logins.get(device_id, 0) + 1

    def offline(self, device_id: uuid.UUID) -> None:
        """The device's session ended."""
        self._latest[device_id] = Presence(online=False, at=utcnow())

    async def flush(self) -> None:
        """Write what has been collected (one transaction)."""
        latest, logins = self._latest, self._logins
        self._latest, self._logins = {}, {}
        if not latest and not logins:
            return
        try:
            await self._store.record(latest, logins)
        except (RegistryUnavailableError, SQLAlchemyError, OSError) as exc:
            # Presence is best effort: keep the newest state for the next attempt.
            self._outage.failed("presence: device status and last_seen_at wait", exc)
            for device_id, presence in latest.items():
                self._latest.setdefault(device_id, presence)
            for device_id, count in logins.items():
                self._logins[device_id] = self._logins.get(device_id, 0) + count
            return
        self._outage.succeeded()
        self.batches_written += 1

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stopping

    def request_stop(self) -> None:
        """Make :meth:`run` return after the batch in progress is written (never cut off: a
        cancelled write would lose the batch it had taken); the owner then flushes once more."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Write behind until :meth:`request_stop` (or until cancelled)."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            if self._stopping:
                break
            await self.flush()

    async def start_clean(self) -> None:
        """Nobody is online in a broker that just started (a dead process left its devices online)."""
        count = await self._store.mark_all_offline()
        if count:
            logger.info("marked %d devices offline that a previous run left online", count)
