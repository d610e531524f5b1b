"""Figure 6: the registry at 100k devices, SQLite and PostgreSQL: bulk insert, then lookups.

Measured in the bench process, through :class:`provisioning.registry.DeviceRegistry` (the
calls the broker and the CLI make), one call at a time: p50 and p99 of each kind.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from provisioning.registry import DeviceRegistry, DeviceStatus
from tests.bench.context import Context
from tests.bench.figures.common import sqlite_url
from tests.bench.fleet import Fleet, make_fleet, prepare, write_fleet
from tests.bench.results import FigureResult, Goal, Row, percentile

NAME = "registry"
TITLE = "registry lookups"
#: A fleet in steady state: mostly offline or online, a few waiting, a few retired.
STATUS_MIX = (
    (DeviceStatus.OFFLINE, 0.60),
    (DeviceStatus.ONLINE, 0.30),
    (DeviceStatus.REGISTERED, 0.05),
    (DeviceStatus.PENDING, 0.03),
    (DeviceStatus.DECOMMISSIONED, 0.02),
)
P50_GOAL_MS = 5.0
P99_GOAL_MS = 20.0


@dataclass
class _Backend:
    name: str
    insert_seconds: float
    timings: dict[str, list[float]]


def run(ctx: Context) -> FigureResult:
    """SQLite in a private file; PostgreSQL in a private database, dropped afterwards."""
    sizes = ctx.sizes
    figure = FigureResult(NAME, TITLE)
    ctx.log(f"creating {sizes.registry_devices:,} device rows")
    fleet = make_fleet(sizes.registry_devices, cost=sizes.bcrypt_cost, statuses=STATUS_MIX)
    backends: list[_Backend] = []
    backends.append(asyncio.run(_measure(ctx, "SQLite", sqlite_url(ctx.workdir / "registry.db"), fleet)))
    reason = asyncio.run(_postgres_unavailable(ctx.postgres_url))
    if reason is None:
        backends.append(asyncio.run(_on_postgres(ctx, fleet)))
    else:
        figure.notes.append(f"PostgreSQL skipped: {reason}")
    for backend in backends:
        for kind, values in backend.timings.items():
            label = f"registry {sizes.registry_devices // 1000}k, {backend.name}: {kind}"
            figure.rows += [
                Row(f"{label} p50", "ms", percentile(values, 50), goal=Goal("at_most", P50_GOAL_MS, "ms")),
                Row(f"{label} p99", "ms", percentile(values, 99), goal=Goal("at_most", P99_GOAL_MS, "ms")),
            ]
        rate = sizes.registry_devices / backend.insert_seconds
        figure.notes.append(
            f"{backend.name}: bulk insert of {sizes.registry_devices:,} devices took "
            f"{backend.insert_seconds:.1f} s ({rate:,.0f} rows/s, executemany in chunks of 5,000)"
        )
    figure.processes = {"mqttprov": "the bench process itself, one call at a time (no broker)"}
    figure.sizes = {"devices": sizes.registry_devices, "lookups_per_kind": sizes.registry_lookups}
    figure.notes.append(
        "page of 50: list_devices(status=S, limit=50), S drawn uniformly from the five statuses of the fleet "
        "(60% offline, 30% online, 5% registered, 3% pending, 2% decommissioned); first page"
    )
    return figure


async def _measure(ctx: Context, name: str, url: str, fleet: Fleet) -> _Backend:
    engine = await prepare(url)
    registry = DeviceRegistry(engine)
    try:
        began = time.perf_counter()
        await write_fleet(engine, fleet)
        insert_seconds = time.perf_counter() - began
        ctx.log(f"{name}: {len(fleet.devices):,} rows inserted in {insert_seconds:.1f} s")
        picks = random.Random(6).sample(fleet.devices, min(ctx.sizes.registry_lookups, len(fleet.devices)))
        statuses = [status for status, _ in STATUS_MIX]
        chooser = random.Random(7)
        calls: dict[str, Callable[[int], Awaitable[object]]] = {
            "MAC lookup": lambda n: registry.find_by_mac(picks[n].mac),
            "login lookup": lambda n: registry.find_credentials_by_username(picks[n].username),
            "page of 50 by status": lambda _n: registry.list_devices(
                status=chooser.choice(statuses), limit=50
            ),
        }
        timings: dict[str, list[float]] = {}
        for kind, call in calls.items():
            await call(0)  # first use: connection and statement caches
            values = []
            for n in range(len(picks)):
                started = time.perf_counter()
                found = await call(n)
                values.append((time.perf_counter() - started) * 1000)
                if found is None:
                    raise AssertionError(f"{name}: {kind} found nothing for a device that exists")
            timings[kind] = values
            ctx.log(
                f"{name}: {kind}: p50 {percentile(values, 50):.2f} ms, p99 {percentile(values, 99):.2f} ms"
            )
        return _Backend(name, insert_seconds, timings)
    finally:
        await registry.close()


def _admin_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _postgres_unavailable(url: str) -> str | None:
    """None when PostgreSQL answers at ``url``, else why not."""
    try:
        import asyncpg  # noqa: PLC0415 - optional extra
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[postgres]')"
    try:
        conn = await asyncpg.connect(_admin_dsn(url), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"not reachable at {url}: {exc}"
    await conn.close()
    return None


async def _on_postgres(ctx: Context, fleet: Fleet) -> _Backend:
    import asyncpg  # noqa: PLC0415

    name = f"mqttprov_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_admin_dsn(ctx.postgres_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        return await _measure(ctx, "PostgreSQL", _with_database(ctx.postgres_url, name), fleet)
    finally:
        admin = await asyncpg.connect(_admin_dsn(ctx.postgres_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
