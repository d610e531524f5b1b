"""Credentials: generated passwords, and bcrypt off the event loop, in a bounded pool of worker threads.

bcrypt releases the GIL while it works, so threads give real parallelism; the pool is sized to
leave one core to the event loop so the broker keeps serving while a burst of hashes runs.

Work that can wait (the credential pool's fill) goes through :meth:`PasswordHasher.hash_when_idle`:
it starts only while no other bcrypt work is queued or running, one hash at a time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import bcrypt

from provisioning.errors import UnusablePasswordError

T = TypeVar("T")

#: bcrypt only looks at the first 72 bytes; bcrypt 5 raises on longer input.
MAX_PASSWORD_BYTES = 72
#: Generated passwords: 32 characters of the URL-safe alphabet (192 bits).
PASSWORD_LENGTH = 32


def default_workers() -> int:
    """Leave one core to the event loop (at least one worker)."""
    return max(1, (os.cpu_count() or 2) - 1)


def generate_password() -> str:
    """A new random password: 32 URL-safe characters from :mod:`secrets`."""
    return secrets.token_urlsafe(24)


def password_bytes(password: str) -> bytes:
    """The bytes bcrypt will see, or :class:`UnusablePasswordError` if it cannot take them."""
    raw = password.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise UnusablePasswordError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    if b"\x00" in raw:
        raise UnusablePasswordError("password contains a NUL byte")
    return raw


class PasswordHasher:
    """Hash and verify passwords with bcrypt at a fixed cost, in worker threads.

    It also keeps what admission control needs: how many checks are queued or running, and how
    long one takes (a moving average of the time spent in a worker). Idle-time hashes
    (:meth:`hash_when_idle`) are counted apart and never in ``pending``.
    """

    def __init__(self, cost: int, *, workers: int | None = None) -> None:
        self.cost = cost
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bcrypt")
        self.pending = 0
        self.seconds_per_check: float | None = None
        #: bcrypt operations started (hashes and checks): tests count cache hits with it.
        self.operations = 0
        #: Idle-time hashes started (the credential pool's fill), never part of ``operations``.
        self.idle_operations = 0
        #: Seconds operations (not idle-time hashes) waited for a worker thread, and how many
        #: waited: a sum and a count, as a metrics summary wants them.
        self.wait_seconds = 0.0
        self.waits = 0
        # Jobs of hash/verify that a worker thread has not finished yet: unlike ``pending``, a job
        # whose caller was cancelled counts until its thread is done with it.
        self._busy = 0
        # Checks announced by a caller that queues them itself (the login budget) and has not
        # finished yet: idle-time hashes wait for them as for work already submitted.
        self._expected = 0
        self._idle_running = False
        # Set whenever a job ends: an idle-time hash waiting for a quiet moment looks again.
        self._job_ended = asyncio.Event()

    def expected_wait(self) -> float:
        """Seconds a check submitted now would wait before a worker starts it (estimate)."""
        per_check = self.seconds_per_check or 0.0
        queued = max(0, self.pending - self.workers + 1)
        return queued * per_check / self.workers

    async def hash(self, password: str) -> str:
        """The bcrypt hash of ``password`` (computed off the event loop)."""
        raw = password_bytes(password)
        salt = bcrypt.gensalt(rounds=self.cost)
        digest: bytes = await self._run(bcrypt.hashpw, raw, salt)
        return digest.decode("ascii")

    async def verify(self, password: str, hashed: str) -> bool:
        """True when ``password`` matches ``hashed``; unusable passwords and bad hashes are False."""
        try:
            raw = password_bytes(password)
        except UnusablePasswordError:
            return False
        result: bool = await self._run(_checkpw, raw, hashed)
        return result

    def expect(self, count: int) -> None:
        """Announce (``+1``) or withdraw (``-1``) a check a caller is about to submit.

        A caller that queues checks before they reach the workers (the login budget) announces
        each one from the moment it arrives until it is over, so that an idle-time hash never
        slips in between two of its checks.
        """
        self._expected += count
        if not self._expected:
            self._job_ended.set()

    async def hash_when_idle(self, password: str) -> str:
        """As :meth:`hash`, started only when no other bcrypt work is queued or running.

        At most one idle-time hash runs at a time, so work submitted after it waits for that one
        hash at most (and for none when there is more than one worker). Cancelling the caller
        before the hash starts submits nothing.
        """
        raw = password_bytes(password)
        while self._busy or self._idle_running or self._expected:
            self._job_ended.clear()
            await self._job_ended.wait()
        # No await between the check above and the submission: nothing can slip in between.
        salt = bcrypt.gensalt(rounds=self.cost)
        job = self._pool.submit(_timed, bcrypt.hashpw, raw, salt)
        self._idle_running = True
        self.idle_operations += 1
        digest, _, elapsed = await self._finish(job, self._idle_ended)
        self._record(elapsed)
        return digest.decode("ascii")

    async def _run(self, fn: Callable[[bytes, Any], T], raw: bytes, other: Any) -> T:
        self.pending += 1
        self.operations += 1
        try:
            submitted = time.perf_counter()
            job = self._pool.submit(_timed, fn, raw, other)
            self._busy += 1
            result, began, elapsed = await self._finish(job, self._job_done)
        finally:
            self.pending -= 1
        self.wait_seconds += max(0.0, began - submitted)
        self.waits += 1
        self._record(elapsed)
        return result

    async def _finish(self, job: Future[T], ended: Callable[[], None]) -> T:
        """Wait for ``job``; ``ended`` runs on the loop once no worker thread is on it any more."""
        waited = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(waited)
        except asyncio.CancelledError:
            job.cancel()  # only succeeds while it waits for a worker; a running hash runs to its end
            raise
        finally:
            if waited.done():
                _settled(waited, ended)
            else:
                waited.add_done_callback(lambda future: _settled(future, ended))

    def _job_done(self) -> None:
        self._busy -= 1
        self._job_ended.set()

    def _idle_ended(self) -> None:
        self._idle_running = False
        self._job_ended.set()

    def _record(self, elapsed: float) -> None:
        previous = self.seconds_per_check
        self.seconds_per_check = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed

    def close(self) -> None:
        """Stop the worker threads (waits for running hashes)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _settled(future: asyncio.Future[Any], ended: Callable[[], None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a caller that stopped waiting is not told, nor is asyncio
    ended()


def _timed(fn: Callable[[bytes, Any], T], raw: bytes, other: Any) -> tuple[T, float, float]:
    """``fn``'s result, when the worker began it (``perf_counter``, one clock for all threads), and
    how long it took."""
    started = time.perf_counter()
    result = fn(raw, other)
    return result, started, time.perf_counter() - started


def _checkpw(raw: bytes, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(raw, hashed.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
