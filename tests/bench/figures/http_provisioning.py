"""Figure: enrolments over ``POST /api/v1/provision`` against enrolments over MQTT, same broker.

One ``mqttprov serve`` hosts both transports on the same services (one bcrypt pool, one
provisioning service, the same rate limits), so the two sides differ only in the transport:
rounds of distinct new MACs, alternately over MQTT (``provision/request``, as the
``provisioning`` figure) and over HTTP, at the same bcrypt cost and concurrency.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx

from tests.bench.context import Context
from tests.bench.figures.common import FLEET_SECRET, enrolment_settings, free_port, sqlite_url
from tests.bench.figures.external import load_average
from tests.bench.figures.http_api import served_api
from tests.bench.fleet import create_empty_registry, mac_for
from tests.bench.load import ProvisionResult, ProvisionTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median, percentile

NAME = "http-provisioning"
TITLE = "HTTP vs MQTT provisioning"
TIME_LIMIT = 180.0
#: Distinct MAC prefixes per transport, apart from every other figure's.
_MQTT_PREFIX = 0x0A
_HTTP_PREFIX = 0x0E


def run(ctx: Context) -> FigureResult:
    """Rounds interleaved (MQTT, HTTP, MQTT, HTTP), each ``provision_devices`` new MACs."""
    sizes = ctx.sizes
    cost = sizes.bcrypt_cost
    figure = FigureResult(NAME, TITLE)
    load_before = load_average()
    url = sqlite_url(ctx.workdir / "http-provisioning.db")
    create_empty_registry(url)
    port = free_port()
    # No credential pool: every enrolment on either side costs one bcrypt hash when it is asked
    # for, rather than the first round drawing on what idle time hashed before it.
    settings = enrolment_settings(url, port, cost=cost)
    settings["provisioning"] |= {"credential_pool_size": 0}
    results: dict[str, list[ProvisionResult]] = {"MQTT": [], "HTTP": []}
    with served_api(port, ctx.workdir, settings) as (broker, api):
        for number in range(sizes.http_provision_rounds):
            first = number * sizes.provision_devices
            for transport, prefix in (("MQTT", _MQTT_PREFIX), ("HTTP", _HTTP_PREFIX)):
                macs = tuple(mac_for(first + n, prefix=prefix) for n in range(sizes.provision_devices))
                if transport == "MQTT":
                    task = ProvisionTask(
                        port, macs, sizes.provision_concurrency, TIME_LIMIT, "provision", FLEET_SECRET
                    )
                    (result,) = run_load([task], TIME_LIMIT + 60.0, label="provision-mqtt")
                else:
                    result = asyncio.run(provision_over_http(api, macs, sizes.provision_concurrency))
                results[transport].append(result)
                ctx.log(
                    f"round {number + 1}, {transport}: {result.outcomes.get('ok', 0)} devices in "
                    f"{result.ended - result.started:.1f} s = {_rate(result):.1f}/s {result.outcomes}"
                )
    mqtt, http = results["MQTT"], results["HTTP"]
    figure.rows += [
        Row(
            f"HTTP provisioning rate, distinct MACs (cost {cost})",
            "devices/s",
            median([_rate(r) for r in http]),
            median([_rate(r) for r in mqtt]),
            "MQTT provision/request, same broker",
            Goal("ratio_at_least", 0.8),
            [_rate(r) for r in http],
            [_rate(r) for r in mqtt],
        ),
        *(
            Row(
                f"HTTP enrolment latency p{p} (cost {cost})",
                "ms",
                percentile([ms for r in http for ms in r.latencies_ms], p),
                percentile([ms for r in mqtt for ms in r.latencies_ms], p),
                "MQTT, same broker",
            )
            for p in (50, 99)
        ),
    ]
    figure.processes = {
        "mqttprov": "`mqttprov serve --config FILE`: the embedded broker and the API in one process, "
        "one bcrypt pool",
        "MQTT side": f"1 load process, {sizes.provision_concurrency} concurrent provisioning sessions",
        "HTTP side": f"the bench process, httpx, {sizes.provision_concurrency} requests in flight, "
        "a new connection each (a device does not share one)",
    }
    figure.sizes = {"devices_per_round": sizes.provision_devices, "rounds": sizes.http_provision_rounds}
    figure.notes += [
        (
            f"open mode, fleet secret (MQTT: CONNECT as provision; HTTP: Basic provision:<secret>), bcrypt "
            f"cost {cost}, [provisioning] credential_pool_size = 0, per-address limit raised"
        ),
        *(
            f"{transport} round {n + 1}: {r.outcomes}"
            for transport, rounds in results.items()
            for n, r in enumerate(rounds)
            if set(r.outcomes) - {"ok"}
        ),
        f"1-minute load average {load_before:.1f} at the start, {load_average():.1f} at the end",
        *broker.log_summary(),
    ]
    return figure


async def provision_over_http(api: str, macs: tuple[str, ...], concurrency: int) -> ProvisionResult:
    """Enrol each MAC with ``POST /api/v1/provision``, ``concurrency`` at a time; as the MQTT load reports."""
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    pending = iter(macs)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=api, auth=("provision", FLEET_SECRET), limits=limits, timeout=60
    ) as client:

        async def device() -> None:
            for mac in pending:
                began = time.perf_counter()
                try:
                    response = await client.post(
                        "/api/v1/provision", json={"mac": mac, "request_id": uuid.uuid4().hex}
                    )
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                    continue
                body = response.json()
                outcome = (
                    str(body.get("status")) if response.status_code == 200 else str(body.get("error_code"))
                )
                outcomes[outcome] += 1
                if outcome == "ok":
                    latencies.append((time.perf_counter() - began) * 1000)

        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for n in range(min(concurrency, len(macs))):
                group.create_task(device(), name=f"http-device-{n}")
        ended = time.monotonic()
    return ProvisionResult(started, ended, dict(outcomes), latencies)


def _rate(result: ProvisionResult) -> float:
    return result.outcomes.get("ok", 0) / max(result.ended - result.started, 1e-9)
