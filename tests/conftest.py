"""Shared fixtures: a fresh database per test (SQLite file, or a private PostgreSQL database)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import bcrypt
import pytest

from broker.embedded import BrokerServer
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.migrate import upgrade
from tests.helpers import broker_settings

POSTGRES_URL = os.environ.get(
    "MQTTPROV_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's own MQTTPROV_* settings (the test-only ones excepted)."""
    for name in list(os.environ):
        if name.startswith("MQTTPROV_") and not name.startswith("MQTTPROV_TEST_"):
            monkeypatch.delenv(name)
    # `mqttprov serve` hosts the API on 127.0.0.1:9883 by default: serve processes of parallel
    # tests would race for that port. A test that wants the API sets MQTTPROV_API__ENABLED=true
    # (and a port of 0, or a free one); `mqttprov api` ignores this setting.
    monkeypatch.setenv("MQTTPROV_API__ENABLED", "false")


def _postgres_admin_dsn() -> str:
    return POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _postgres_reason() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import asyncpg  # noqa: PLC0415 - optional extra
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[postgres]')"
    try:
        conn = await asyncpg.connect(_postgres_admin_dsn(), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}"
    await conn.close()
    return None


_pg_reason: list[str | None] = []


def postgres_unavailable() -> str | None:
    """Cached reason why PostgreSQL tests must skip (None when they can run)."""
    if not _pg_reason:
        _pg_reason.append(asyncio.run(_postgres_reason()))
    return _pg_reason[0]


def _swap_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _create_pg_database() -> str:
    import asyncpg  # noqa: PLC0415

    name = f"mqttprov_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_postgres_admin_dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_pg_database(name: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(_postgres_admin_dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file of this test's own."""
    return f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped afterwards; skips when none is reachable."""
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    name = asyncio.run(_create_pg_database())
    try:
        yield _swap_database(POSTGRES_URL, name)
    finally:
        asyncio.run(_drop_pg_database(name))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[DeviceRegistry]:
    """A migrated, empty registry on the test's own database."""
    engine = create_engine(database_url)
    await upgrade(engine)
    reg = DeviceRegistry(engine)
    try:
        yield reg
    finally:
        await reg.close()


@pytest.fixture
async def broker(sqlite_url: str) -> AsyncIterator[BrokerServer]:
    """An in-process broker on a loopback port the OS picks (``settings.broker.port`` once started),
    accepting connections when yielded."""
    async with BrokerServer(broker_settings(sqlite_url)) as server:
        yield server


@pytest.fixture
def bcrypt_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every bcrypt run from now on, as ``(function, cost)``."""
    runs: list[tuple[str, int]] = []
    checkpw, hashpw = bcrypt.checkpw, bcrypt.hashpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        runs.append(("checkpw", int(hashed[4:6])))
        return checkpw(password, hashed)

    def counting_hashpw(password: bytes, salt: bytes) -> bytes:
        runs.append(("hashpw", int(salt[4:6])))
        return hashpw(password, salt)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    monkeypatch.setattr(bcrypt, "hashpw", counting_hashpw)
    return runs
