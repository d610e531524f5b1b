"""Log lines a client cannot flood: its values shown short and escaped, refusals once per burst.

A client chooses its client id, username and topics (up to 64 KiB each) and how often it is
refused: logged verbatim, one line per refusal, a single client wrote tens of MB a second.
"""

from __future__ import annotations

import asyncio
import logging
import time

#: Characters of a client's value kept in a log line; the rest is counted, not shown.
MAX_SHOWN = 64
#: Seconds a burst of refusals lasts: the first is logged, the rest counted in one line after it.
BURST_SECONDS = 10.0


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` for a log line: quoted, control and invisible characters escaped, at most
    ``limit`` characters of it (``repr`` escapes what :meth:`str.isprintable` refuses)."""
    if value is None:
        return "None"
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class BurstLog:
    """One line per burst of refusals of one kind: the first in full, then how many followed.

    The count is told :data:`BURST_SECONDS` after the first (by the running event loop), or
    with the next refusal after that when no loop runs.
    """

    def __init__(
        self, logger: logging.Logger, what: str, *, level: int = logging.INFO, window: float = BURST_SECONDS
    ) -> None:
        self._logger = logger
        self._what = what
        self._level = level
        self.window = window
        self._started = 0.0
        self._count = 0
        self._flush_at: asyncio.TimerHandle | None = None

    def refused(self, message: str, *args: object) -> None:
        """Log ``message % args`` if it starts a burst; otherwise count it."""
        if self._count and time.monotonic() - self._started < self.window:
            self._count += 1
            return
        self.flush()
        self._started = time.monotonic()
        self._count = 1
        self._logger.log(self._level, message, *args)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush_at = loop.call_later(self.window, self.flush)

    def flush(self) -> None:
        """End the burst: one line with the refusals counted since its first."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._count > 1:
            self._logger.log(
                self._level,
                "%s: %d more in %.1f s (one line per burst)",
                self._what,
                self._count - 1,
                time.monotonic() - self._started,
            )
        self._count = 0
