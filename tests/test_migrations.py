"""The packaged Alembic migrations: upgrade, revision reporting, and agreement with the models."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning import RegistryUnavailableError
from provisioning.registry import Base, DeviceRegistry, create_engine
from provisioning.registry.migrate import alembic_config, current_revision, head_revision, upgrade


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty, never migrated database of this test's own."""
    eng = create_engine(database_url)
    try:
        yield eng
    finally:
        await eng.dispose()


async def table_names(engine: AsyncEngine) -> set[str]:
    def _names(conn: Connection) -> set[str]:
        return set(inspect(conn).get_table_names())

    async with engine.connect() as conn:
        return await conn.run_sync(_names)


def test_migrations_form_one_line_from_0001_to_head() -> None:
    scripts = ScriptDirectory.from_config(alembic_config())

    assert scripts.get_heads() == [head_revision()]
    assert scripts.get_bases() == ["0001"]


async def test_upgrade_empty_database_to_head(engine: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    assert await current_revision(engine) is None

    with caplog.at_level(logging.INFO, logger="provisioning.registry.migrate"):
        before, after = await upgrade(engine)

    assert (before, after) == (None, head_revision())
    assert await current_revision(engine) == head_revision()
    assert {"devices", "device_events", "alembic_version"} <= await table_names(engine)
    assert f"database migrated from empty to {head_revision()}" in caplog.messages


async def test_second_upgrade_is_a_no_op(engine: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    await upgrade(engine)
    device = await DeviceRegistry(engine).create_device("aa:bb:cc:dd:ee:ff")

    with caplog.at_level(logging.INFO, logger="provisioning.registry.migrate"):
        result = await upgrade(engine)

    assert result == (head_revision(), head_revision())
    assert caplog.messages == []
    # The data survived: nothing was dropped and recreated.
    assert await DeviceRegistry(engine).get(device.id) == device


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    await upgrade(engine)

    def _diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with engine.connect() as conn:
        diff = await conn.run_sync(_diff)

    assert diff == []


async def _aiosqlite_threads_finished() -> None:
    # aiosqlite 0.22 stops the worker thread of a connection that failed to open without waiting
    # for it; the thread then answers on this test's loop, which must still be running.
    for thread in threading.enumerate():
        if thread.name.endswith("(_connection_worker_thread)"):
            await asyncio.to_thread(thread.join, 5)


async def test_current_revision_of_unopenable_database(tmp_path: Path) -> None:
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'registry.db'}")
    try:
        with pytest.raises(RegistryUnavailableError, match="database unavailable"):
            await current_revision(eng)
        with pytest.raises(RegistryUnavailableError):
            await upgrade(eng)
    finally:
        await eng.dispose()
        await _aiosqlite_threads_finished()


def test_migrations_are_package_data() -> None:
    migrations = files("provisioning") / "migrations"

    assert (migrations / "versions" / "0001_initial.py").is_file()
    assert (migrations / "env.py").is_file()
    assert (migrations / "script.py.mako").is_file()
