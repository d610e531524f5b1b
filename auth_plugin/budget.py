"""Fair shares of the bcrypt workers for the login checks that no verifier can answer.

A bcrypt check at cost 12 takes about a quarter of a second of one core, so whoever fills the
workers' queue decides who logs in. Checks are therefore not queued first come, first served:

- each waits in the queue of its *source* (the client's address, or one shared source for
  usernames that are not registered), and a free worker takes the next check from the sources
  in turn, so one address flooding CONNECTs gets one turn per round like a real device does;
- a source whose check found a wrong password is *suspect* for a minute: its checks are served
  only when no other source has one waiting (the passwords mqttprov issues are never mistyped:
  a wrong one is a guess), so a flood of guesses runs on idle time only;
- the queues hold no more than could be checked before a client gives up (the CONNECT
  timeout), counting what the workers have to do first; when they are full, a newcomer takes
  the place of the newest check of a suspect queue, or of the longest queue if that one is
  longer than its own, and is refused at once otherwise (CONNACK 3: "try again"), never queued
  for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque

from provisioning.passwords import PasswordHasher

logger = logging.getLogger(__name__)

#: Seconds one bcrypt check at cost 12 takes on one core of the machines we measured on; the
#: estimate until the workers have timed a check of their own.
_COST_12_SECONDS = 0.24
#: How long a source whose check found a wrong password is served after all others.
SUSPECT_SECONDS = 60.0
#: Suspect sources remembered at once (the oldest are forgotten first).
MAX_SUSPECTS = 10_000


class BcryptBudget:
    """Admission and fair ordering of bcrypt login checks, in front of a :class:`PasswordHasher`."""

    def __init__(self, hasher: PasswordHasher, *, answer_within: float) -> None:
        self._hasher = hasher
        self._answer_within = answer_within
        # Sources with checks waiting, in turn order: the next turn is the first one's.
        self._queues: dict[str, deque[asyncio.Future[bool]]] = {}
        self._waiting = 0
        self._running = 0
        self._burst_refused = 0
        self._burst_started = 0.0
        self._closed = False
        # Source -> until when it is suspect (monotonic), in marking order: oldest first.
        self._suspects: OrderedDict[str, float] = OrderedDict()
        #: Checks refused without being made (the queues were full), since the start.
        self.refused = 0
        #: Turns given back unused: the check could not have ended before its login's deadline.
        self.late = 0
        #: Seconds login checks waited for their turn (given ones only), and how many got one.
        self.turn_wait_seconds = 0.0
        self.turns_given = 0

    @property
    def waiting(self) -> int:
        """Checks waiting for their turn now."""
        return self._waiting

    @property
    def slots(self) -> int:
        """Checks run at once: one per bcrypt worker."""
        return self._hasher.workers

    def _per_check(self) -> float:
        return self._hasher.seconds_per_check or _COST_12_SECONDS * 2.0 ** (self._hasher.cost - 12)

    def capacity(self) -> int:
        """Checks that may wait: as many as the workers can make before a client gives up."""
        return max(self.slots, int(self._answer_within / self._per_check()) * self.slots)

    def close(self) -> None:
        """Refuse every check still waiting and every later one (the workers are about to stop)."""
        self._closed = True
        for queue in self._queues.values():
            for turn in queue:
                if not turn.done():
                    turn.set_result(False)
        self._queues.clear()
        self._waiting = 0

    async def verify(
        self, source: str, password: str, hashed: str, *, deadline: float | None = None
    ) -> bool | None:
        """The bcrypt check of ``password`` against ``hashed`` in ``source``'s turn; None if refused.

        ``deadline`` (the event loop's clock): a turn that comes too late for the check to end
        before it is given back unused, rather than spent on an answer nobody will read.
        """
        # Announced from now until it is over: the credential pool's idle-time hashes wait.
        self._hasher.expect(1)
        try:
            arrived = time.monotonic()
            if self._closed or not await self._turn(source):
                return None
            self.turn_wait_seconds += time.monotonic() - arrived
            self.turns_given += 1
            if deadline is not None and asyncio.get_running_loop().time() + self._per_check() > deadline:
                self.late += 1
                self._release()
                return None
            try:
                verified = await self._hasher.verify(password, hashed)
            finally:
                self._release()
            if not verified:
                self._mark_suspect(source)
            return verified
        finally:
            self._hasher.expect(-1)

    def room(self) -> int:
        """Checks that may wait now: the capacity less the workers' other work (hashes at issue)."""
        return self.capacity() - max(0, self._hasher.pending - self._running)

    async def _turn(self, source: str) -> bool:
        if self._waiting >= self.room() and not self._evict_for(source):
            self._refuse(source)
            return False
        if self._running < self.slots and not self._waiting:
            self._running += 1
            return True
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(source, deque()).append(turn)
        self._waiting += 1
        try:
            given = await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self._release()  # the turn was handed over as the client went away
            else:
                self._withdraw(source, turn)
            raise
        if not given:
            self._refuse(source)
        return given

    def is_suspect(self, source: str) -> bool:
        """True while ``source`` is served after every other (a wrong password, recently)."""
        until = self._suspects.get(source)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._suspects[source]
            return False
        return True

    def _mark_suspect(self, source: str) -> None:
        self._suspects.pop(source, None)
        self._suspects[source] = time.monotonic() + SUSPECT_SECONDS
        while len(self._suspects) > MAX_SUSPECTS:
            self._suspects.popitem(last=False)

    def _evict_for(self, source: str) -> bool:
        """Make room for ``source`` by refusing the newest check of a suspect or a longer queue."""
        own = len(self._queues.get(source, ()))
        suspects = [name for name in self._queues if self.is_suspect(name)]
        if suspects and not self.is_suspect(source):
            own = -1  # any suspect queue gives way to a source that has guessed nothing
            candidates = suspects
        else:
            candidates = suspects if self.is_suspect(source) else list(self._queues)
        longest = max(candidates, key=lambda name: len(self._queues[name]), default=None)
        if longest is None or len(self._queues[longest]) <= own + 1:
            return False
        queue = self._queues[longest]
        evicted = queue.pop()
        self._waiting -= 1
        if not queue:
            del self._queues[longest]
        if not evicted.done():
            evicted.set_result(False)
        return True

    def _withdraw(self, source: str, turn: asyncio.Future[bool]) -> None:
        queue = self._queues.get(source)
        if queue is not None and turn in queue:
            queue.remove(turn)
            self._waiting -= 1
            if not queue:
                del self._queues[source]

    def _release(self) -> None:
        self._running -= 1
        while self._queues and self._running < self.slots:
            source = self._next_source()
            queue = self._queues.pop(source)
            turn = queue.popleft()
            self._waiting -= 1
            if queue:
                self._queues[source] = queue  # to the back of the round
            if turn.done():  # cancelled, its handler not yet run: it withdraws nothing more
                continue
            self._running += 1
            turn.set_result(True)
        if not self._waiting and self._burst_refused:
            logger.info(
                "bcrypt budget: the burst is over; %d login checks refused (CONNACK 3) in %.1fs",
                self._burst_refused,
                time.monotonic() - self._burst_started,
            )
            self._burst_refused = 0

    def _next_source(self) -> str:
        """The first source in turn order that is not suspect; the first of all if all are."""
        for name in self._queues:
            if not self.is_suspect(name):
                return name
        return next(iter(self._queues))

    def _refuse(self, source: str) -> None:
        self.refused += 1
        if not self._burst_refused:
            self._burst_started = time.monotonic()
            logger.warning(
                "bcrypt budget full: refusing login checks that no verifier can answer with CONNACK 3, "
                "first from source %r (%d waiting, %d sources)",
                source,
                self._waiting,
                len(self._queues),
            )
        self._burst_refused += 1
