"""Figure: publish throughput of bystanders while 10,000 devices are connected and subscribed.

Both brokers run as their users start them (``mqttprov serve``, amqtt's ``amqtt`` script with
anonymous auth). The throughput figure's pairs (devices publishing in their namespaces, one
service account subscribed to each) measure first with nobody else connected, then with N other
devices logged in with their own credentials and subscribed to their own namespaces, held on
both brokers at once while the rounds run interleaved. amqtt matches every publish against
every filter in its table; ours walks a topic trie (``broker/topictree.py``).
"""

from __future__ import annotations

from contextlib import ExitStack

from tests.bench.context import Context
from tests.bench.figures.common import (
    held_on_each,
    mqttprov_settings,
    served_processes,
    served_side_by_side,
    sqlite_url,
)
from tests.bench.figures.throughput import create_publishers, pubsub_rate
from tests.bench.fleet import create_registry, make_fleet
from tests.bench.load import Pair, PubSubResult, PubSubTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median
from tests.bench.served import ServedBroker

NAME = "many-subscribers"
TITLE = "publish throughput with many subscribed devices"
#: Stored hashes at bcrypt cost 4: each subscriber's first login is a check, and what is measured
#: comes after every one of them is in.
SUBSCRIBERS_COST = 4
#: Messages a publisher may have ahead of its subscriber (amqtt is left no backlog past a round).
WINDOW = 10
#: The subscribers' MACs start here, past the publishers' (MACs are unique in the registry).
FIRST_MAC = 1_000_000
HOLD_LIMIT = 600.0
_CONCURRENCY = 50
SIDES = ("ours", "amqtt")


def run(ctx: Context) -> FigureResult:
    """Throughput without subscribers (once per side), then with N held on both, rounds interleaved."""
    sizes = ctx.sizes
    count = sizes.many_subscribers
    figure = FigureResult(NAME, TITLE)
    url = sqlite_url(ctx.workdir / "many-subscribers.db")
    pairs = create_publishers([url], sizes.throughput_devices, SUBSCRIBERS_COST)
    fleet = make_fleet(count, cost=SUBSCRIBERS_COST, start=FIRST_MAC)
    create_registry(url, fleet)
    filters = [device.namespace + "#" for device in fleet.devices]
    alone: dict[str, list[float]] = {side: [] for side in SIDES}
    crowded: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    # Every subscriber connects from 127.0.0.1: the per-address limit (2,000, for one misbehaving
    # host) is raised as for a load test from one host.
    limits = {"max_connections_per_address": count + 1_000}
    with ExitStack() as stack:
        brokers = served_side_by_side(
            stack,
            ctx.workdir,
            lambda port: mqttprov_settings(url, port, cost=SUBSCRIBERS_COST, broker=limits),
        )
        if not ctx.quick:  # the baseline with nobody else connected: --quick stays short without it
            for side, broker in brokers.items():
                rate, _cpu = _round(ctx, figure, broker, pairs, f"{side} alone")
                alone[side].append(rate)
        # Both brokers' subscribers connect at once: most of the figure's time is their first logins.
        everyone = stack.enter_context(
            held_on_each(
                [broker.port for broker in brokers.values()],
                fleet.logins(),
                concurrency=_CONCURRENCY,
                time_limit=HOLD_LIMIT,
                name="subscribers",
                topic_filters=filters,
                retry_delay=1.0,
            )
        )
        for side, held in zip(brokers, everyone, strict=True):
            ctx.log(
                f"{side:5}: {held.connected} devices connected and subscribed in {held.seconds:.1f} s "
                f"({held.retries} CONNACK 3 retried)"
            )
            if held.connected != count:
                figure.notes.append(
                    f"{side}: only {held.connected} of {count} subscribers held "
                    f"(refused {held.refused}, errors {held.errors})"
                )
        for number in range(1, sizes.subscription_rounds + 1):
            for side, broker in brokers.items():
                rate, micros = _round(ctx, figure, broker, pairs, f"round {number} {side}")
                crowded[side].append(rate)
                cpu[side].append(micros)
        logs = [line for broker in brokers.values() for line in broker.log_summary()]
    figure.rows += _rows(sizes.throughput_devices, count, alone, crowded, cpu)
    load = (
        f"1 load process: {sizes.throughput_devices} publishers + {sizes.throughput_devices} subscribers, "
        f"QoS 0, 48-byte payloads, at most {WINDOW} messages per publisher not yet delivered; 1 load "
        f"process per broker holding the {count:,} subscribed devices"
    )
    figure.processes = served_processes(load)
    figure.sizes = {
        "subscribers": count,
        "publishers": sizes.throughput_devices,
        "messages_per_publisher": sizes.many_subscribers_messages,
        "round_seconds": sizes.many_subscribers_seconds,
        "rounds_per_side": sizes.subscription_rounds,
    }
    figure.notes += [
        (
            f"subscribers: devices logged in with their own credentials (bcrypt cost {SUBSCRIBERS_COST}), "
            "each subscribed to devices/<id>/#, a login told CONNACK 3 tried again 1 s later; ours with "
            "[broker] max_connections_per_address raised "
            "above their number (all connect from 127.0.0.1)"
        ),
        (
            f"a round ends after {sizes.many_subscribers_seconds:g} s (and up to 5 s for what was sent to "
            "arrive) even if not every message went through; the rate counts what was delivered"
        ),
        *logs,
    ]
    return figure


def _round(
    ctx: Context, figure: FigureResult, broker: ServedBroker, pairs: tuple[Pair, ...], label: str
) -> tuple[float, float]:
    """One throughput measurement: delivered msg/s and the broker's CPU µs per delivered message."""
    sizes = ctx.sizes
    limit = sizes.many_subscribers_seconds
    task = PubSubTask(broker.port, pairs, sizes.many_subscribers_messages, limit, window=WINDOW)
    used = broker.cpu_seconds()
    result: PubSubResult
    (result,) = run_load([task], limit + 60.0, label=f"pubsub-{broker.kind}")
    micros = (broker.cpu_seconds() - used) * 1e6 / max(result.received, 1)
    rate = pubsub_rate(result)
    ctx.log(
        f"{label:14}: {result.received} of {result.sent} sent "
        f"({sizes.many_subscribers_messages * len(pairs)} asked) delivered in "
        f"{result.last_received - result.first_sent:.2f} s = {rate:,.0f} msg/s, {micros:,.0f} µs CPU each"
    )
    if result.received < result.sent:
        figure.notes.append(f"{label}: {result.sent - result.received} messages sent but not delivered")
    return rate, micros


def _rows(
    devices: int,
    count: int,
    alone: dict[str, list[float]],
    crowded: dict[str, list[float]],
    cpu: dict[str, list[float]],
) -> list[Row]:
    reference = "amqtt anonymous, same subscribers"
    rows = [
        Row(
            f"publish throughput, {devices} devices, with {count:,} subscribed devices",
            "msg/s",
            median(crowded["ours"]),
            median(crowded["amqtt"]),
            reference,
            Goal("ratio_at_least", 0.7),
            crowded["ours"],
            crowded["amqtt"],
        ),
        Row(
            "broker CPU per delivered message, with them",
            "µs",
            median(cpu["ours"]),
            median(cpu["amqtt"]),
            reference,
            None,
            cpu["ours"],
            cpu["amqtt"],
        ),
    ]
    if alone["ours"]:
        rows.append(
            Row(
                f"publish throughput, {devices} devices, nobody else connected",
                "msg/s",
                median(alone["ours"]),
                median(alone["amqtt"]),
                "amqtt anonymous",
                None,
                alone["ours"],
                alone["amqtt"],
            )
        )
    return rows
