"""bcrypt hashing runs off the event loop and refuses what bcrypt cannot take."""

from __future__ import annotations

import asyncio
import string
import threading
from collections.abc import Iterator

import bcrypt
import pytest

from provisioning.errors import UnusablePasswordError
from provisioning.passwords import PasswordHasher, generate_password, password_bytes


@pytest.fixture
def hasher() -> Iterator[PasswordHasher]:
    h = PasswordHasher(cost=4, workers=2)
    yield h
    h.close()


async def test_hash_then_verify(hasher: PasswordHasher) -> None:
    hashed = await hasher.hash("correct horse")
    assert hashed.startswith("$2b$04$")
    assert await hasher.verify("correct horse", hashed) is True
    assert await hasher.verify("wrong horse", hashed) is False


async def test_hash_uses_the_configured_cost() -> None:
    h = PasswordHasher(cost=5, workers=1)
    try:
        assert (await h.hash("x")).startswith("$2b$05$")
    finally:
        h.close()


async def test_hashing_happens_in_worker_threads(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = bcrypt.hashpw

    def spy(raw: bytes, salt: bytes) -> bytes:
        seen.append(threading.current_thread().name)
        return real(raw, salt)

    monkeypatch.setattr(bcrypt, "hashpw", spy)
    await hasher.hash("pw")
    assert len(seen) == 1
    assert seen[0].startswith("bcrypt")
    assert seen[0] != threading.main_thread().name


async def test_concurrent_hashes_all_complete(hasher: PasswordHasher) -> None:
    hashes = await asyncio.gather(*(hasher.hash(f"pw{i}") for i in range(8)))
    assert len(set(hashes)) == 8
    checks = await asyncio.gather(*(hasher.verify(f"pw{i}", h) for i, h in enumerate(hashes)))
    assert all(checks)


@pytest.mark.parametrize("password", ["a" * 73, "é" * 37, "nul\x00byte"])
async def test_unusable_passwords_are_refused_cleanly(hasher: PasswordHasher, password: str) -> None:
    with pytest.raises(UnusablePasswordError):
        await hasher.hash(password)
    good = await hasher.hash("fine")
    assert await hasher.verify(password, good) is False


def test_72_bytes_is_still_usable() -> None:
    assert len(password_bytes("a" * 72)) == 72


async def test_verify_against_garbage_hash_is_false(hasher: PasswordHasher) -> None:
    assert await hasher.verify("pw", "not-a-bcrypt-hash") is False
    assert await hasher.verify("pw", "") is False


def test_generated_passwords_are_32_url_safe_characters() -> None:
    alphabet = set(string.ascii_letters + string.digits + "-_")
    passwords = {generate_password() for _ in range(200)}
    assert len(passwords) == 200
    for pw in passwords:
        assert len(pw) == 32
        assert set(pw) <= alphabet
