"""Figure: a bystander's delivery latency while a device sends maximal SUBSCRIBEs over a retained store.

Both brokers run as their users start them (``mqttprov serve``, amqtt's ``amqtt`` script with
anonymous auth) and hold the same N retained messages (a fleet's retained state, one per device
namespace). A probe device publishes at a steady rate to a service account subscribed to its
namespace (the bystander); once it has a baseline, another device sends SUBSCRIBEs back to
back, each carrying as many filters as ``[broker] max_filters_per_subscribe`` allows, half of
them wildcards, all in its own namespace. Every SUBSCRIBE makes the broker find the retained
messages its filters match: amqtt by matching every stored topic against every filter, ours
through a topic trie (``broker/topictree.py``). A stalled loop shows as delivery latency.
"""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from dataclasses import dataclass, replace

from config.models import BrokerSettings
from tests.bench.context import Context
from tests.bench.figures.common import mqttprov_settings, served_processes, served_side_by_side, sqlite_url
from tests.bench.fleet import create_registry, hash_password, make_fleet
from tests.bench.load import Login, ProbeResult, ProbeTask
from tests.bench.procs import LoadProcess, run_load
from tests.bench.results import FigureResult, Goal, Row, median, percentile
from tests.bench.subscriptions import RetainResult, RetainTask, SubscribeStormResult, SubscribeStormTask

NAME = "subscribe-storm"
TITLE = "bystander latency during a storm of maximal SUBSCRIBEs"
STORM_COST = 4
PROBE_RATE = 200.0
TIME_LIMIT = 300.0
PROBE_ACCOUNT = "benchprobe"
GATEWAY_ACCOUNT = "benchgateway"
#: The most filters one SUBSCRIBE may carry in ours (default settings); amqtt takes them all too.
FILTERS = BrokerSettings().max_filters_per_subscribe
SIDES = ("ours", "amqtt")


@dataclass(frozen=True)
class _Setup:
    attacker: Login
    topic_filters: tuple[str, ...]
    probe: ProbeTask
    gateway: Login
    retained_topics: tuple[str, ...]


@dataclass
class _Round:
    storm: SubscribeStormResult
    quiet_ms: list[float]
    storm_ms: list[float]
    lost: int


def run(ctx: Context) -> FigureResult:
    """Fill both retained stores, then interleaved rounds: baseline, storm, on ours and on amqtt."""
    sizes = ctx.sizes
    figure = FigureResult(NAME, TITLE)
    url = sqlite_url(ctx.workdir / "subscribe-storm.db")
    # The probe's baseline before each storm (its p99 is a row): shorter in --quick.
    setup = _create(url, sizes.storm_retained, quiet_seconds=0.5 if ctx.quick else 1.0)
    rounds: dict[str, list[_Round]] = {side: [] for side in SIDES}
    with ExitStack() as stack:
        brokers = served_side_by_side(
            stack, ctx.workdir, lambda port: mqttprov_settings(url, port, cost=STORM_COST)
        )
        for side, broker in brokers.items():
            task = RetainTask(broker.port, setup.gateway, setup.retained_topics, TIME_LIMIT)
            stored: RetainResult
            (stored,) = run_load([task], TIME_LIMIT + 60.0, label=f"retain-{side}")
            ctx.log(f"{side:5}: {stored.published:,} retained messages stored in {stored.seconds:.2f} s")
        for number in range(1, sizes.subscription_rounds + 1):
            for side, broker in brokers.items():
                result = _round(broker.port, setup, sizes.storm_subscribes, side)
                rounds[side].append(result)
                _log_round(ctx, number, side, result, sizes.storm_subscribes)
                if result.lost or result.storm.refused:
                    figure.notes.append(
                        f"round {number} {side}: {result.lost} probe messages lost, "
                        f"{result.storm.refused} filters refused"
                    )
        logs = [line for broker in brokers.values() for line in broker.log_summary()]
    figure.rows += _rows(rounds, sizes.storm_retained)
    load = (
        f"1 probe process ({PROBE_RATE:g} msg/s, a device to a service account), 1 attacker process "
        f"({sizes.storm_subscribes} SUBSCRIBEs of {FILTERS} filters, sent in one write)"
    )
    figure.processes = served_processes(load)
    figure.sizes = {
        "retained_messages": sizes.storm_retained,
        "filters_per_subscribe": FILTERS,
        "subscribes_per_storm": sizes.storm_subscribes,
        "probe_rate": PROBE_RATE,
        "rounds_per_side": sizes.subscription_rounds,
    }
    figure.notes += [
        (
            f"retained store: one message on devices/<id>/state per device namespace, published by one "
            f"service account; the attacker's filters: {_describe(setup.topic_filters)}"
        ),
        (
            "latency: from the probe's PUBLISH to its delivery to the subscriber; 'during' counts every "
            "probe message sent from the storm's first SUBSCRIBE until its last SUBACK came back"
        ),
        *logs,
    ]
    return figure


def storm_filters(namespace: str, count: int) -> tuple[str, ...]:
    """``count`` distinct filters under ``namespace`` (``devices/<id>/``): half wildcards, half exact."""
    wildcards = count // 2
    found: list[str] = []
    for depth in range(wildcards):
        # '+/+/.../#' and '+/+/.../+', deeper each time.
        pluses = "+/" * (depth // 2)
        found.append(namespace + pluses + ("#" if depth % 2 == 0 else "+"))
    found += [f"{namespace}sensor/{n}/value" for n in range(count - wildcards)]
    return tuple(found)


def _describe(filters: tuple[str, ...]) -> str:
    wild = sum("+" in f or "#" in f for f in filters)
    return f"{len(filters)} in its namespace, {wild} with wildcards (e.g. {filters[0]}, {filters[3]})"


def _create(url: str, retained: int, *, quiet_seconds: float) -> _Setup:
    """The registry (attacker, probe device and account, gateway account) and the retained topics."""
    fleet = make_fleet(2, cost=STORM_COST)
    attacker, prober = fleet.devices
    password = f"bench-{uuid.uuid4().hex}"
    hashed = hash_password(password, STORM_COST)
    probe_ns = prober.namespace
    accounts = [
        (PROBE_ACCOUNT, hashed, [{"action": "subscribe", "filter": probe_ns + "#"}]),
        (
            GATEWAY_ACCOUNT,
            hashed,
            [{"action": "publish", "filter": "devices/#"}, {"action": "subscribe", "filter": "devices/#"}],
        ),
    ]
    create_registry(url, fleet, accounts)
    # The fleet's retained state: the two devices' own, and one per other device namespace.
    namespaces = [attacker.namespace, probe_ns] + [f"devices/{uuid.uuid4()}/" for _ in range(retained - 2)]
    probe = ProbeTask(
        0,
        prober.login,
        Login(f"{PROBE_ACCOUNT}-sub", PROBE_ACCOUNT, password),
        probe_ns + "telemetry",
        probe_ns + "#",
        PROBE_RATE,
        TIME_LIMIT,
        quiet_seconds,
    )
    return _Setup(
        attacker.login,
        storm_filters(attacker.namespace, FILTERS),
        probe,
        Login(GATEWAY_ACCOUNT, GATEWAY_ACCOUNT, password),
        tuple(ns + "state" for ns in namespaces[:retained]),
    )


def _round(port: int, setup: _Setup, repeats: int, side: str) -> _Round:
    probe_task = replace(setup.probe, port=port)
    storm_task = SubscribeStormTask(port, setup.attacker, setup.topic_filters, repeats, TIME_LIMIT)
    prober = LoadProcess(probe_task, f"probe-{side}")
    attacker = LoadProcess(storm_task, f"attacker-{side}")
    try:
        prober.expect("ready", 60.0)
        attacker.expect("ready", 60.0)
        prober.send("go")
        prober.expect("quiet", probe_task.quiet_seconds + 30.0)
        attacker.send("go")
        storm: SubscribeStormResult = attacker.expect("result", TIME_LIMIT + 30.0)
        prober.send("stop")
        samples: ProbeResult = prober.expect("result", 30.0)
    finally:
        attacker.close()
        prober.close()
    quiet: list[float] = []
    during: list[float] = []
    lost = 0
    for sent, latency in zip(samples.sent_at, samples.latencies_ms, strict=True):
        if latency is None:
            lost += 1
        elif sent < storm.started:
            quiet.append(latency)
        else:
            during.append(latency)
    return _Round(storm, quiet, during, lost)


def _log_round(ctx: Context, number: int, side: str, result: _Round, repeats: int) -> None:
    storm = result.storm
    seconds = storm.ended - storm.started
    ctx.log(
        f"round {number} {side:5}: {repeats} SUBSCRIBEs in {seconds:.2f} s "
        f"({storm.granted} filters granted, {storm.refused} refused, {storm.retained} retained delivered); "
        f"probe p99 {_p(result.quiet_ms, 99):.1f} ms quiet, during: p99 {_p(result.storm_ms, 99):.1f} ms, "
        f"max {max(result.storm_ms, default=0.0):.1f} ms ({len(result.storm_ms)} samples, {result.lost} lost)"
    )


def _p(values: list[float], p: float) -> float:
    return percentile(values, p) if values else float("nan")


def _rows(rounds: dict[str, list[_Round]], retained: int) -> list[Row]:
    reference = f"amqtt anonymous, same {retained:,} retained"
    maxima = {side: [max(r.storm_ms) for r in rounds[side] if r.storm_ms] for side in SIDES}
    rates = {side: [_storm_rate(r.storm) for r in rounds[side]] for side in SIDES}

    def p99(side: str, *, quiet: bool) -> list[float]:
        found = [r.quiet_ms if quiet else r.storm_ms for r in rounds[side]]
        return [percentile(values, 99) for values in found if values]

    def row(label: str, unit: str, samples: dict[str, list[float]], goal: Goal | None = None) -> Row:
        # The worst round for the maximum (the goal is about any stall), the median otherwise.
        pick = (lambda v: max(v, default=None)) if goal is not None else median
        ours, amqtt = samples["ours"], samples["amqtt"]
        return Row(label, unit, pick(ours), pick(amqtt), reference, goal, ours, amqtt)

    return [
        row(
            f"bystander delivery max during a SUBSCRIBE storm ({retained:,} retained)",
            "ms",
            maxima,
            Goal("at_most", 1000.0, "ms"),
        ),
        row("bystander delivery p99 during the storm", "ms", {s: p99(s, quiet=False) for s in SIDES}),
        row("bystander delivery p99 before the storm", "ms", {s: p99(s, quiet=True) for s in SIDES}),
        row(f"maximal SUBSCRIBEs ({FILTERS} filters) answered", "/s", rates),
    ]


def _storm_rate(storm: SubscribeStormResult) -> float:
    subscribes = (storm.granted + storm.refused) / FILTERS
    return subscribes / max(storm.ended - storm.started, 1e-9)
