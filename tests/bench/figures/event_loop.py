"""Figure: the warm reconnect storm and publish throughput of ``mqttprov serve`` on uvloop and on asyncio.

Two brokers started as users start them, the same settings but ``[broker] event_loop``; the
same devices and client code on both, rounds interleaved.
"""

from __future__ import annotations

import importlib.util
import itertools
from contextlib import ExitStack

from tests.bench.context import Context
from tests.bench.figures.common import (
    describe_logins,
    device_logins,
    free_port,
    mqttprov_settings,
    sqlite_url,
)
from tests.bench.figures.common import storm as connect_storm
from tests.bench.figures.throughput import create_publishers, pubsub_rate
from tests.bench.fleet import create_registry, make_fleet
from tests.bench.load import PubSubResult, PubSubTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median
from tests.bench.served import ServedBroker

NAME = "uvloop"
TITLE = "event loop: uvloop against asyncio"
#: Stored hashes at cost 4: the figure is about the loop, and warm logins cost no bcrypt.
LOOP_COST = 4
TIME_LIMIT = 120.0
LOOPS = ("uvloop", "asyncio")


def run(ctx: Context) -> FigureResult:
    """Warm storm, then throughput, each interleaved uvloop / asyncio."""
    figure = FigureResult(NAME, TITLE)
    if importlib.util.find_spec("uvloop") is None:
        figure.notes.append("uvloop is not installed: nothing to compare (pip install uvloop)")
        return figure
    sizes = ctx.sizes
    # A database per broker: two processes writing presence to one SQLite file would wait on each other.
    storm_urls = {loop: sqlite_url(ctx.workdir / f"{loop}-storm.db") for loop in LOOPS}
    pubsub_urls = {loop: sqlite_url(ctx.workdir / f"{loop}-pubsub.db") for loop in LOOPS}
    fleet = make_fleet(sizes.warm_devices, cost=LOOP_COST)
    for url in storm_urls.values():
        create_registry(url, fleet)
    logins = fleet.logins()
    reconnects = list(itertools.islice(itertools.cycle(logins), sizes.warm_reconnects))
    pairs = create_publishers(list(pubsub_urls.values()), sizes.throughput_devices, LOOP_COST)
    storms: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    throughput: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    # Broker CPU per operation: what the loop costs, whatever the neighbours do to the rates.
    storm_cpu: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    pubsub_cpu: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    with ExitStack() as stack:
        brokers = _start(ctx, stack, storm_urls)
        for loop, broker in brokers.items():
            warm_up = device_logins(
                broker.port, logins, concurrency=sizes.storm_concurrency, time_limit=TIME_LIMIT, label="w"
            )
            ctx.log(f"{loop} warm-up: {describe_logins(warm_up)}")
        for number in range(1, sizes.rounds + 1):
            for loop, broker in brokers.items():
                used = broker.cpu_seconds()
                result = connect_storm(
                    broker.port,
                    reconnects,
                    concurrency=sizes.storm_concurrency,
                    processes=sizes.storm_processes,
                    time_limit=TIME_LIMIT,
                )
                storms[loop].append(result.rate)
                storm_cpu[loop].append(_micros(broker.cpu_seconds() - used, result.accepted))
                ctx.log(f"round {number} {loop:7} warm storm: {result.rate:,.0f}/s {result.failures}")
                if result.failures:
                    figure.notes.append(f"round {number} {loop} warm storm: {result.failures}")
        logs = [line for broker in brokers.values() for line in broker.log_summary()]
        for broker in brokers.values():
            broker.stop()
        brokers = _start(ctx, stack, pubsub_urls)
        for number in range(1, sizes.rounds + 1):
            for loop, broker in brokers.items():
                task = PubSubTask(broker.port, pairs, sizes.throughput_messages, TIME_LIMIT)
                used = broker.cpu_seconds()
                published: PubSubResult
                (published,) = run_load([task], TIME_LIMIT + 60.0, label=f"pubsub-{loop}")
                throughput[loop].append(pubsub_rate(published))
                pubsub_cpu[loop].append(_micros(broker.cpu_seconds() - used, published.received))
                ctx.log(f"round {number} {loop:7} throughput: {throughput[loop][-1]:,.0f} msg/s")
        logs += [line for broker in brokers.values() for line in broker.log_summary()]
    figure.notes += logs
    figure.rows += [
        Row(
            "warm reconnect storm on uvloop",
            "connects/s",
            median(storms["uvloop"]),
            median(storms["asyncio"]),
            "asyncio's loop",
            Goal("ratio_at_least", 1.0),
            storms["uvloop"],
            storms["asyncio"],
        ),
        Row(
            f"publish throughput on uvloop ({sizes.throughput_devices} devices)",
            "msg/s",
            median(throughput["uvloop"]),
            median(throughput["asyncio"]),
            "asyncio's loop",
            Goal("ratio_at_least", 1.0),
            throughput["uvloop"],
            throughput["asyncio"],
        ),
    ]
    figure.rows += [
        Row(
            label,
            "µs",
            median(cpu["uvloop"]),
            median(cpu["asyncio"]),
            "asyncio's loop",
            None,
            cpu["uvloop"],
            cpu["asyncio"],
        )
        for label, cpu in (
            ("broker CPU per warm reconnect on uvloop", storm_cpu),
            ("broker CPU per delivered message on uvloop", pubsub_cpu),
        )
    ]
    figure.processes = {
        "uvloop": "broker: `mqttprov serve`, [broker] event_loop = 'uvloop'; 1 load process per measurement",
        "asyncio": "the same with event_loop = 'asyncio'",
    }
    figure.sizes = {
        "devices": sizes.warm_devices,
        "reconnects_per_round": sizes.warm_reconnects,
        "messages_per_device": sizes.throughput_messages,
        "rounds_per_side": sizes.rounds,
    }
    figure.notes.append(
        f"stored hashes at bcrypt cost {LOOP_COST} (the warm storm checks none); goal: uvloop is the "
        "default only where it is at least as fast"
    )
    return figure


def _micros(seconds: float, count: int) -> float:
    return seconds * 1e6 / max(count, 1)


def _start(ctx: Context, stack: ExitStack, urls: dict[str, str]) -> dict[str, ServedBroker]:
    """One ``mqttprov serve`` per event loop, each on its own database; stopped with ``stack``."""
    brokers: dict[str, ServedBroker] = {}
    for loop, url in urls.items():
        port = free_port()
        settings = mqttprov_settings(url, port, cost=LOOP_COST, broker={"event_loop": loop})
        brokers[loop] = stack.enter_context(ServedBroker("mqttprov", port, ctx.workdir, settings=settings))
    return brokers
