"""Credentials: generated passwords, and bcrypt off the event loop, in a bounded pool of worker threads.

bcrypt releases the GIL while it works, so threads give real parallelism; the pool is sized to
leave one core to the event loop so the broker keeps serving while a burst of hashes runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from provisioning.errors import UnusablePasswordError

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
    """Hash and verify passwords with bcrypt at a fixed cost, in worker threads."""

    def __init__(self, cost: int, *, workers: int | None = None) -> None:
        self.cost = cost
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bcrypt")

    async def hash(self, password: str) -> str:
        """The bcrypt hash of ``password`` (computed off the event loop)."""
        raw = password_bytes(password)
        salt = bcrypt.gensalt(rounds=self.cost)
        digest = await asyncio.get_running_loop().run_in_executor(self._pool, bcrypt.hashpw, raw, salt)
        return digest.decode("ascii")

    async def verify(self, password: str, hashed: str) -> bool:
        """True when ``password`` matches ``hashed``; unusable passwords and bad hashes are False."""
        try:
            raw = password_bytes(password)
        except UnusablePasswordError:
            return False
        return await asyncio.get_running_loop().run_in_executor(self._pool, _checkpw, raw, hashed)

    def close(self) -> None:
        """Stop the worker threads (waits for running hashes)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _checkpw(raw: bytes, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(raw, hashed.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
