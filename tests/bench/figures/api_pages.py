"""Figure: pages of ``GET /api/v1/devices`` over 100k devices, against the same page read in-process.

The registry is written in bulk (as the ``registry`` figure writes it, plus a ``site`` label on
every device), then ``mqttprov serve`` hosts the API on it. The bench process asks for one page
at a time over a kept-alive httpx connection, and reads the same page straight from
:meth:`DeviceRegistry.search_devices` on its own engine, the two interleaved (which goes first
alternates), so the ratio is what the HTTP layer adds: routing, the token check, the query's
parsing, the JSON of 50 devices, the loopback.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning.registry import DeviceFilter, DeviceRegistry
from provisioning.registry.models import DeviceLabel
from provisioning.registry.tokens import Scope, TokenStore
from tests.bench.context import Context
from tests.bench.figures.common import free_port, mqttprov_settings
from tests.bench.figures.external import load_average
from tests.bench.figures.http_api import DatabaseUnavailableError, registry_database, served_api
from tests.bench.figures.registry import STATUS_MIX
from tests.bench.fleet import Fleet, make_fleet, prepare, write_fleet
from tests.bench.results import FigureResult, Goal, Row, percentile

NAME = "api-pages"
TITLE = "API device pages"
PAGE = 50
SITES = tuple(f"site-{n:02d}" for n in range(10))
#: Cursors taken at random deep positions before timing; the cursor pages cycle through them.
CURSORS = 20
_CHUNK = 5000
BACKENDS = ("SQLite", "PostgreSQL")


@dataclass(frozen=True)
class Ask:
    """One page: the query string the API gets and the same request to the registry."""

    params: dict[str, str | int]
    wanted: DeviceFilter
    offset: int = 0
    after: str | None = None


@dataclass
class _Measured:
    name: str
    http: dict[str, list[float]] = field(default_factory=dict)
    direct: dict[str, list[float]] = field(default_factory=dict)


def run(ctx: Context) -> FigureResult:
    """SQLite in a private file, PostgreSQL in a private database when it answers."""
    sizes = ctx.sizes
    figure = FigureResult(NAME, TITLE)
    load_before = load_average()
    ctx.log(f"creating {sizes.registry_devices:,} device rows")
    fleet = make_fleet(sizes.registry_devices, cost=sizes.bcrypt_cost, statuses=STATUS_MIX)
    measured: list[_Measured] = []
    for backend in BACKENDS:
        try:
            measured.append(asyncio.run(_measure(ctx, backend, fleet)))
        except DatabaseUnavailableError as exc:
            figure.notes.append(f"{backend} skipped: {exc}")
    count = sizes.registry_devices
    size = f"{count // 1000}k" if count >= 1000 else str(count)
    for side in measured:
        for kind, http in side.http.items():
            direct = side.direct[kind]
            for p in (50, 99):
                figure.rows.append(
                    Row(
                        f"API page of {PAGE}, {size}, {side.name}: {kind} p{p}",
                        "ms",
                        percentile(http, p),
                        percentile(direct, p),
                        "search_devices in-process",
                    )
                )
        # docs/api.md: a cursor "costs the same at any depth"; an offset does not.
        first = percentile(side.http["page 1"], 50)
        for kind, goal in (
            ("deep page by cursor", Goal("ratio_at_most", 1.5)),
            ("deep page by offset", None),
        ):
            figure.rows.append(
                Row(
                    f"API {kind} vs page 1, {size}, {side.name} (p50)",
                    "ms",
                    percentile(side.http[kind], 50),
                    first,
                    "page 1 over HTTP",
                    goal,
                )
            )
    figure.processes = {
        "mqttprov": "`mqttprov serve --config FILE` with [api] enabled (port 0, read back from its log)",
        "client": "the bench process: httpx, one request at a time on a kept-alive connection",
        "reference": "the bench process: DeviceRegistry.search_devices on its own engine, same database",
    }
    figure.sizes = {"devices": sizes.registry_devices, "requests_per_kind": sizes.api_page_requests}
    figure.notes += [
        (
            f"pages of {PAGE}, oldest first, with the exact total; statuses as in the registry figure; "
            f"every device carries site=<one of {len(SITES)}>"
        ),
        (
            "page 1: no filter; deep page by offset: offset drawn from 50-95% of the fleet; "
            f"deep page by cursor: after=<next_cursor of one of {CURSORS} pages taken at such depths>; "
            "label filter: label=site=<random>, page 1; q prefix: q=<the first five octets of a random "
            "device's MAC> (at most 256 devices), page 1"
        ),
        (
            f"1-minute load average {load_before:.1f} at the start, {load_average():.1f} at the end, on "
            f"{os.cpu_count()} CPUs: the server, the client and the reference share them"
        ),
    ]
    return figure


async def _measure(ctx: Context, backend: str, fleet: Fleet) -> _Measured:
    async with registry_database(backend, ctx.workdir, ctx.postgres_url) as url:
        engine = await prepare(url)
        registry = DeviceRegistry(engine)
        try:
            began = time.perf_counter()
            await write_fleet(engine, fleet)
            await _write_labels(engine, fleet)
            if engine.dialect.name == "postgresql":
                # What autovacuum does within a minute of a bulk load: measured at once, the pages
                # would be planned without statistics (a label page: 70 ms instead of about 10).
                async with engine.begin() as conn:
                    await conn.execute(text("ANALYZE"))
            ctx.log(
                f"{backend}: {len(fleet.devices):,} devices and labels in {time.perf_counter() - began:.1f} s"
            )
            token = (await TokenStore(engine).create("bench-reader", frozenset({Scope.READ}))).secret
            asks = await _asks(registry, fleet)
            with ExitStack() as stack:
                port = free_port()
                settings = mqttprov_settings(url, port, cost=ctx.sizes.bcrypt_cost)
                _broker, api = await asyncio.to_thread(
                    stack.enter_context, served_api(port, ctx.workdir, settings)
                )
                headers = {"Authorization": f"Bearer {token}"}
                async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as client:
                    return await _timed(ctx, backend, registry, client, asks)
        finally:
            await registry.close()


async def _write_labels(engine: AsyncEngine, fleet: Fleet) -> None:
    rows = [
        {"device_id": device.id, "key": "site", "value": SITES[n % len(SITES)]}
        for n, device in enumerate(fleet.devices)
    ]
    for begin in range(0, len(rows), _CHUNK):
        async with engine.begin() as conn:
            await conn.execute(insert(DeviceLabel), rows[begin : begin + _CHUNK])


async def _asks(registry: DeviceRegistry, fleet: Fleet) -> dict[str, Callable[[], Ask]]:
    """What each kind of page asks for, drawn afresh for every request."""
    count = len(fleet.devices)
    chooser = random.Random(15)
    low, high = count // 2, max(count // 2, count * 95 // 100 - PAGE)
    cursors = []
    for _ in range(CURSORS):
        page = await registry.search_devices(DeviceFilter(), limit=PAGE, offset=chooser.randint(low, high))
        assert page.next_cursor is not None
        cursors.append(page.next_cursor)

    def deep_offset() -> Ask:
        offset = chooser.randint(low, high)
        return Ask({"offset": offset}, DeviceFilter(), offset=offset)

    def deep_cursor() -> Ask:
        after = chooser.choice(cursors)
        return Ask({"after": after}, DeviceFilter(), after=after)

    def label() -> Ask:
        site = chooser.choice(SITES)
        return Ask({"label": f"site={site}"}, DeviceFilter(labels={"site": site}))

    def prefix() -> Ask:
        q = chooser.choice(fleet.devices).mac[:14]
        return Ask({"q": q}, DeviceFilter(search=q))

    return {
        "page 1": lambda: Ask({}, DeviceFilter()),
        "deep page by offset": deep_offset,
        "deep page by cursor": deep_cursor,
        "label filter": label,
        "q prefix": prefix,
    }


async def _timed(
    ctx: Context,
    backend: str,
    registry: DeviceRegistry,
    client: httpx.AsyncClient,
    asks: dict[str, Callable[[], Ask]],
) -> _Measured:
    measured = _Measured(backend)
    for kind, make in asks.items():
        http: list[float] = []
        direct: list[float] = []
        # The first request of each kind opens connections and fills statement caches: untimed.
        for n in range(ctx.sizes.api_page_requests + 1):
            ask = make()
            first, second = (_over_http, _in_process) if n % 2 else (_in_process, _over_http)
            one = await first(ask, registry, client)
            other = await second(ask, registry, client)
            if one[1] != other[1]:
                raise AssertionError(
                    f"{backend}: {kind} {ask.params}: totals differ ({one[1]} vs {other[1]})"
                )
            if n:
                (http if first is _over_http else direct).append(one[0])
                (direct if first is _over_http else http).append(other[0])
        measured.http[kind], measured.direct[kind] = http, direct
        ctx.log(
            f"{backend}: {kind}: HTTP p50 {percentile(http, 50):.2f} ms, p99 {percentile(http, 99):.2f} ms; "
            f"in-process p50 {percentile(direct, 50):.2f} ms, p99 {percentile(direct, 99):.2f} ms"
        )
    return measured


async def _over_http(ask: Ask, _registry: DeviceRegistry, client: httpx.AsyncClient) -> tuple[float, int]:
    params: dict[str, Any] = {"limit": PAGE, **ask.params}
    started = time.perf_counter()
    response = await client.get("/api/v1/devices", params=params)
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    body = response.json()
    if not body["devices"]:
        raise AssertionError(f"GET /api/v1/devices {params}: an empty page")
    return elapsed, int(body["total"])


async def _in_process(ask: Ask, registry: DeviceRegistry, _client: httpx.AsyncClient) -> tuple[float, int]:
    started = time.perf_counter()
    page = await registry.search_devices(ask.wanted, limit=PAGE, offset=ask.offset, after=ask.after)
    return (time.perf_counter() - started) * 1000, page.total
