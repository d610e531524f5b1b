"""One log story per outage (of the database, or of another dependency such as Mosquitto): a
WARNING when it starts, counted repeats, INFO when it ends.

Every background loop of a process (change-feed follower, presence writer, bridge follower)
reports its database failures and successes to the process's one :class:`OutageLog`. An outage
reads as::

    WARNING database unavailable (change feed: ...): connection refused
    WARNING database still unavailable after 60 s: 118 failures (change feed, presence); last: ...
    INFO    database recovered after 73.2 s (131 failures)

and never as a traceback per failure: unavailability is routine, tracebacks are for bugs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: Seconds between two "still unavailable" lines of one outage.
REPEAT_EVERY = 60.0

_default_logger = logging.getLogger(__name__)


class OutageLog:
    """Turns a stream of failures and successes into the lines of one outage."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        repeat_every: float = REPEAT_EVERY,
        clock: Callable[[], float] = time.monotonic,
        subject: str = "database",
    ) -> None:
        self._logger = logger or _default_logger
        self._subject = subject
        self._repeat_every = repeat_every
        self._clock = clock
        self._since: float | None = None
        self._next_repeat = 0.0
        self._failures = 0
        self._affected: dict[str, None] = {}  # ordered set: the parts that failed, first first
        #: Outages seen so far (each began with one WARNING).
        self.outages = 0

    @property
    def down(self) -> bool:
        """True between a failure and the next success."""
        return self._since is not None

    def failed(self, affected: str, exc: BaseException) -> None:
        """A database call failed; ``affected`` says what this stops (shown in the first line)."""
        now = self._clock()
        self._failures += 1
        self._affected.setdefault(affected.split(":", 1)[0], None)
        if self._since is None:
            self._since = now
            self._next_repeat = now + self._repeat_every
            self.outages += 1
            self._logger.warning("%s unavailable (%s): %s", self._subject, affected, _one_line(exc))
            return
        if now >= self._next_repeat:
            self._next_repeat = now + self._repeat_every
            self._logger.warning(
                "%s still unavailable after %.0f s: %d failures (%s); last: %s",
                self._subject,
                now - self._since,
                self._failures,
                ", ".join(self._affected),
                _one_line(exc),
            )

    def succeeded(self) -> None:
        """A database call succeeded: ends the outage in progress, if any."""
        if self._since is None:
            return
        self._logger.info(
            "%s recovered after %.1f s (%d failures)",
            self._subject,
            self._clock() - self._since,
            self._failures,
        )
        self._since = None
        self._failures = 0
        self._affected.clear()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
