"""Offline persistent sessions end ``[broker] session_expiry`` seconds after their connection did.

MQTT 3.1.1 keeps a session with clean session off, and the messages queued for it, until its
client returns. A broker that keeps them for ever is one whose memory any account can grow by
connecting under ever new client ids (``NAME-<suffix>``) and leaving: this loop bounds that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker.embedded.control import BrokerLink

logger = logging.getLogger(__name__)

#: The longest pause between two sweeps: a session is discarded at most this late.
MAX_SWEEP_INTERVAL = 60.0


class SessionExpiry:
    """Sweeps the broker's offline persistent sessions (a loop for :class:`broker.core.Supervised`)."""

    def __init__(self, link: BrokerLink, expiry: float) -> None:
        self._link = link
        self._expiry = expiry
        # A tenth of the expiry, at most a minute: a session outlives its expiry by that at most.
        self._interval = min(MAX_SWEEP_INTERVAL, expiry / 10)
        self._stop = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Make :meth:`run` return after the sweep in progress."""
        self._stop.set()

    async def run(self) -> None:
        """Sweep every interval until :meth:`request_stop`."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
            if self._stop.is_set():
                return
            expired = await self._link.expire_offline(self._expiry, time.monotonic())
            if expired:
                logger.info("%d offline sessions expired after %gs", expired, self._expiry)
