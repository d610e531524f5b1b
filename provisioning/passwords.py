"""Credentials: generated passwords, and bcrypt off the event loop, in a bounded pool of worker threads.

bcrypt releases the GIL while it works, so threads give real parallelism; the pool is sized to
leave one core to the event loop so the broker keeps serving while a burst of hashes runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    long one takes (a moving average of the time spent in a worker).
    """

    def __init__(self, cost: int, *, workers: int | None = None) -> None:
        self.cost = cost
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bcrypt")
        self.pending = 0
        self.seconds_per_check: float | None = None
        #: bcrypt operations started (hashes and checks): tests count cache hits with it.
        self.operations = 0

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

    async def _run(self, fn: Callable[[bytes, Any], T], raw: bytes, other: Any) -> T:
        self.pending += 1
        self.operations += 1
        try:
            result, elapsed = await asyncio.get_running_loop().run_in_executor(
                self._pool, _timed, fn, raw, other
            )
        finally:
            self.pending -= 1
        previous = self.seconds_per_check
        self.seconds_per_check = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        return result

    def close(self) -> None:
        """Stop the worker threads (waits for running hashes)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _timed(fn: Callable[[bytes, Any], T], raw: bytes, other: Any) -> tuple[T, float]:
    started = time.perf_counter()
    result = fn(raw, other)
    return result, time.perf_counter() - started


def _checkpw(raw: bytes, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(raw, hashed.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
