"""The packaged Alembic migrations: upgrade, revision reporting, and agreement with the models."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning import RegistryUnavailableError
from provisioning.registry import Base, DeviceRegistry, create_engine
from provisioning.registry.migrate import alembic_config, current_revision, head_revision, upgrade
from provisioning.registry.revisions import head_of, packaged_head, stored_revisions, upgrade_if_behind


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


@pytest.mark.slow
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


# -- start-up without Alembic when the database is at head -------------------------------------


def test_packaged_head_is_alembics_head() -> None:
    # The revision files as read without Alembic must name the head Alembic would: a new
    # migration that this reader sees otherwise fails here, not on a broker's start-up.
    assert packaged_head() == head_revision()


def _revision_file(directory: Path, name: str, revision: str, down: str | tuple[str, ...] | None) -> None:
    (directory / name).write_text(
        f'"""{name}"""\n\nrevision: str = {revision!r}\ndown_revision = {down!r}\n', encoding="utf-8"
    )


def test_head_of_one_line_of_revisions(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("", encoding="utf-8")
    _revision_file(tmp_path, "0002_b.py", "0002", "0001")
    _revision_file(tmp_path, "0001_a.py", "0001", None)
    _revision_file(tmp_path, "0003_c.py", "0003", "0002")

    assert head_of(tmp_path) == "0003"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("0003_c.py", "0003", "0001"), id="branch"),
        pytest.param(("0003_c.py", "0003", ("0001", "0002")), id="merge"),
        pytest.param(("0003_c.py", "0003", "0009"), id="missing-down-revision"),
        pytest.param(("0003_c.py", "0002", "0001"), id="revision-twice"),
    ],
)
def test_head_of_anything_but_one_line_is_left_to_alembic(
    tmp_path: Path, extra: tuple[str, str, str | tuple[str, ...]]
) -> None:
    _revision_file(tmp_path, "0001_a.py", "0001", None)
    _revision_file(tmp_path, "0002_b.py", "0002", "0001")
    _revision_file(tmp_path, *extra)

    assert head_of(tmp_path) is None


def test_head_of_a_file_without_literal_revisions_is_left_to_alembic(tmp_path: Path) -> None:
    _revision_file(tmp_path, "0001_a.py", "0001", None)
    (tmp_path / "0002_b.py").write_text('revision = "00" + "02"\ndown_revision = "0001"\n', encoding="utf-8")

    assert head_of(tmp_path) is None


def test_head_of_a_file_that_assigns_its_revision_twice_is_left_to_alembic(tmp_path: Path) -> None:
    _revision_file(tmp_path, "0001_a.py", "0001", None)
    (tmp_path / "0002_b.py").write_text(
        'revision = "0002"\ndown_revision = "0001"\nrevision = "0003"\n', encoding="utf-8"
    )

    assert head_of(tmp_path) is None


def test_head_of_no_revisions_is_left_to_alembic(tmp_path: Path) -> None:
    assert head_of(tmp_path) is None


async def test_start_up_migrates_an_empty_database(engine: AsyncEngine) -> None:
    assert await upgrade_if_behind(engine) == (None, head_revision())
    assert await current_revision(engine) == head_revision()


@pytest.mark.slow
async def test_start_up_migrates_a_database_behind_head(engine: AsyncEngine) -> None:
    await upgrade(engine, "0003")

    assert await upgrade_if_behind(engine) == ("0003", head_revision())
    assert await current_revision(engine) == head_revision()


async def _record_revision(engine: AsyncEngine, sql: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql))


async def test_start_up_refuses_a_database_ahead_of_head(engine: AsyncEngine) -> None:
    # Written by a newer mqttprov: Alembic refuses it, at start-up as in `mqttprov db upgrade`.
    await upgrade(engine)
    await _record_revision(engine, "UPDATE alembic_version SET version_num = '9999'")

    for migrate in (upgrade_if_behind, upgrade):
        with pytest.raises(CommandError, match="Can't locate revision identified by '9999'"):
            await migrate(engine)
    assert await stored_revisions(engine) == ("9999",)


async def test_several_recorded_revisions_are_refused(engine: AsyncEngine) -> None:
    await upgrade(engine)
    await _record_revision(engine, "INSERT INTO alembic_version (version_num) VALUES ('0001')")

    with pytest.raises(RegistryUnavailableError, match="several revisions"):
        await current_revision(engine)
    with pytest.raises(RegistryUnavailableError, match="several revisions"):
        await upgrade_if_behind(engine)


_START_AT_HEAD = """
import asyncio, sys
import broker
from provisioning.registry import create_engine
from provisioning.registry.revisions import upgrade_if_behind

async def main() -> None:
    engine = create_engine(sys.argv[1])
    try:
        print(await upgrade_if_behind(engine))
    finally:
        await engine.dispose()

asyncio.run(main())
print(sorted({name.split(".")[0] for name in sys.modules} & {"alembic", "mako", "pygments"}))
"""


@pytest.mark.slow
async def test_broker_start_up_at_head_imports_no_alembic(sqlite_url: str) -> None:
    eng = create_engine(sqlite_url)
    try:
        await upgrade(eng)
    finally:
        await eng.dispose()
    head = head_revision()

    done = subprocess.run(
        [sys.executable, "-c", _START_AT_HEAD, sqlite_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str((head, head)), "[]"]
