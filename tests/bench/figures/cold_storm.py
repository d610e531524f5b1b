"""Figures 2 and 3: a cold login storm (fresh broker, empty cache) and delivery latency during it.

Each round starts a fresh broker process, with a verifier key of its own, so that no login is
answered by a verifier an earlier round stored. A probe device publishes 50 msg/s to a service
account subscribed to its namespace: first without load (the baseline), then while the storm
runs. The same rounds run against amqtt's ``auth_db`` plugin with the same users and hashes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.bench.brokers import BrokerProcess, BrokerSpec
from tests.bench.context import Context
from tests.bench.figures.common import StormSummary, free_port, mqttprov_settings, sqlite_url, storm
from tests.bench.fleet import create_auth_db, create_registry, hash_password, make_fleet, seconds_per_check
from tests.bench.load import Login, ProbeResult, ProbeTask
from tests.bench.procs import LoadProcess
from tests.bench.results import FigureResult, Goal, Row, median, percentile

NAME = "cold-storm"
TITLE = "cold login storm and delivery latency during it"
PROBE_ACCOUNT = "benchprobe"
STORM_LIMIT = 180.0


@dataclass
class _Round:
    storm: StormSummary
    quiet_ms: list[float]
    storm_ms: list[float]
    lost: int
    series: list[tuple[float, float]]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Probe:
    publisher: Login
    subscriber: Login
    topic: str
    topic_filter: str


def run(ctx: Context) -> FigureResult:
    """Interleaved rounds: ours (fresh broker), amqtt auth_db (fresh broker), ours, amqtt, ..."""
    sizes = ctx.sizes
    cost = sizes.bcrypt_cost
    figure = FigureResult(NAME, TITLE)
    ctx.log(f"creating {sizes.cold_logins} devices and the probe (bcrypt cost {cost})")
    fleet = make_fleet(sizes.cold_logins + 1, cost=cost)
    probe_device, devices = fleet.devices[0], fleet.devices[1:]
    probe_password = f"bench-probe-{uuid.uuid4().hex}"
    probe_hash = hash_password(probe_password, cost)
    namespace = f"devices/{probe_device.id}/"
    url = sqlite_url(ctx.workdir / "cold-storm.db")
    rules = [{"action": "subscribe", "filter": namespace + "#"}]
    create_registry(url, fleet, [(PROBE_ACCOUNT, probe_hash, rules)])
    auth_db_url = sqlite_url(ctx.workdir / "cold-storm-auth-db.db")
    users = [(d.username, fleet.hashes[d.password]) for d in fleet.devices] + [(PROBE_ACCOUNT, probe_hash)]
    create_auth_db(auth_db_url, users)
    probe = _Probe(
        probe_device.login,
        Login(f"{PROBE_ACCOUNT}-sub", PROBE_ACCOUNT, probe_password),
        namespace + "telemetry",
        namespace + "#",
    )
    ours_logins = [d.login for d in devices]
    auth_db_logins = ours_logins[: sizes.auth_db_logins]

    ours: list[_Round] = []
    auth_db: list[_Round] = []
    bounds: list[float] = []
    checks_ms: list[float] = []
    logs: list[str] = []
    workers = 0
    for number in range(1, sizes.rounds + 1):
        check = seconds_per_check(cost)
        checks_ms.append(check * 1000)
        port = free_port()
        # A verifier key of its own per round: the verifiers the last round stored are foreign to
        # it, so every login is a bcrypt check again (a cold storm, as after a key change).
        key = {"verifier_key": f"cold-storm-round-{number}-{uuid.uuid4().hex}"}
        spec = BrokerSpec("mqttprov", port, mqttprov_settings(url, port, cost=cost, auth=key))
        result = _round(ctx, spec, ours_logins, probe, logs)
        workers = int(result.stats["bcrypt_workers"])
        bounds.append(workers / check)
        ours.append(result)
        _log_round(ctx, number, "ours", result, f"bound {workers / check:.1f}/s")
        spec = BrokerSpec("amqtt-auth-db", free_port(), auth_db_url=auth_db_url, auth_db_rounds=cost)
        result = _round(ctx, spec, auth_db_logins, probe, logs)
        auth_db.append(result)
        _log_round(ctx, number, "auth_db", result, "")

    ours_rates = [r.storm.rate for r in ours]
    auth_rates = [r.storm.rate for r in auth_db]
    figure.rows += [
        Row(
            f"cold login storm (bcrypt cost {cost})",
            "logins/s",
            median(ours_rates),
            median(bounds),
            f"bcrypt bound, {workers} worker(s)",
            Goal("ratio_at_least", 0.8),
            ours_rates,
            bounds,
        ),
        Row(
            "cold storm vs amqtt auth_db",
            "logins/s",
            median(ours_rates),
            median(auth_rates),
            f"amqtt auth_db, bcrypt cost {cost}",
            None,
            ours_rates,
            auth_rates,
        ),
    ]
    figure.rows += _latency_rows(ours, auth_db)
    figure.series = {f"mqttprov, round {n}": r.series for n, r in enumerate(ours, 1)} | {
        f"amqtt auth_db, round {n}": r.series for n, r in enumerate(auth_db, 1)
    }
    load = f"{sizes.storm_processes} storm process(es) with {sizes.storm_concurrency} concurrent clients"
    probe_side = f"1 probe process ({sizes.probe_rate:g} msg/s)"
    figure.processes = {
        "mqttprov": f"broker: 1 fresh process per round (event loop + {workers} bcrypt worker threads); "
        f"{load}; {probe_side}",
        "amqtt auth_db": f"broker: 1 fresh process per round (bcrypt on its event loop); "
        f"{load}; {probe_side}",
    }
    figure.sizes = {
        "logins_per_round": len(ours_logins),
        "auth_db_logins_per_round": len(auth_db_logins),
        "rounds_per_side": sizes.rounds,
        "concurrency": sizes.storm_concurrency,
        "quiet_seconds": sizes.quiet_seconds,
        "probe_rate": sizes.probe_rate,
    }
    in_run = [r.stats.get("seconds_per_check") for r in ours]
    figure.notes += [
        f"one bcrypt check at cost {cost}, measured in the bench process before each round: "
        + ", ".join(f"{ms:.1f} ms" for ms in checks_ms),
        "the broker's own moving average of a check during its storm: "
        + ", ".join(f"{s * 1000:.1f} ms" if isinstance(s, float) else "—" for s in in_run),
        "overload refusals (CONNACK 3) per round: "
        + ", ".join(str(r.stats.get("overload_refusals", 0)) for r in ours),
        (
            f"amqtt auth_db runs with its hasher at {cost} rounds, the stored cost (by default it would "
            "also rehash every cost-10 hash to cost 12 on each login)"
        ),
        *_failures(ours, "ours"),
        *_failures(auth_db, "auth_db"),
        *logs,
    ]
    return figure


def _round(ctx: Context, spec: BrokerSpec, logins: list[Login], probe: _Probe, logs: list[str]) -> _Round:
    sizes = ctx.sizes
    with BrokerProcess(spec, ctx.workdir) as broker:
        task = ProbeTask(
            broker.port,
            probe.publisher,
            probe.subscriber,
            probe.topic,
            probe.topic_filter,
            sizes.probe_rate,
            sizes.quiet_seconds + STORM_LIMIT + 60.0,
            sizes.quiet_seconds,
        )
        prober = LoadProcess(task, f"probe-{spec.kind}")
        try:
            prober.expect("ready", 60.0)
            prober.send("go")
            prober.expect("quiet", sizes.quiet_seconds + 30.0)
            summary = storm(
                broker.port,
                logins,
                concurrency=sizes.storm_concurrency,
                processes=sizes.storm_processes,
                time_limit=STORM_LIMIT,
            )
            prober.send("stop")
            samples: ProbeResult = prober.expect("result", 30.0)
        finally:
            prober.close()
        stats = broker.stats() if spec.kind == "mqttprov" else {}
    logs += broker.log_summary()
    return _split(summary, samples, stats)


def _split(summary: StormSummary, samples: ProbeResult, stats: dict[str, Any]) -> _Round:
    quiet: list[float] = []
    during: list[float] = []
    series: list[tuple[float, float]] = []
    lost = 0
    for sent, latency in zip(samples.sent_at, samples.latencies_ms, strict=True):
        if latency is None:
            lost += 1
            continue
        series.append((sent - summary.started, latency))
        if sent < summary.started:
            quiet.append(latency)
        elif sent <= summary.ended:
            during.append(latency)
    return _Round(summary, quiet, during, lost, series, stats)


def _p(values: list[float], p: float) -> float | None:
    return percentile(values, p) if values else None


def _latency_rows(ours: list[_Round], auth_db: list[_Round]) -> list[Row]:
    storm_ms = [v for r in ours for v in r.storm_ms]
    quiet_ms = [v for r in ours for v in r.quiet_ms]
    auth_storm_ms = [v for r in auth_db for v in r.storm_ms]

    def per_round(rounds: list[_Round], p: float, during: bool) -> list[float]:
        found = [_p(r.storm_ms if during else r.quiet_ms, p) for r in rounds]
        return [v for v in found if v is not None]

    return [
        Row(
            "delivery p50 during the cold storm",
            "ms",
            _p(storm_ms, 50),
            _p(quiet_ms, 50),
            "same broker, no storm",
            None,
            per_round(ours, 50, during=True),
            per_round(ours, 50, during=False),
        ),
        Row(
            "delivery p99 during the cold storm",
            "ms",
            _p(storm_ms, 99),
            _p(quiet_ms, 99),
            "same broker, no storm",
            Goal("at_most", 50.0, "ms"),
            per_round(ours, 99, during=True),
            per_round(ours, 99, during=False),
        ),
        Row(
            "delivery p99 during the storm vs amqtt auth_db",
            "ms",
            _p(storm_ms, 99),
            _p(auth_storm_ms, 99),
            "amqtt auth_db during its storm",
            None,
            per_round(ours, 99, during=True),
            per_round(auth_db, 99, during=True),
        ),
    ]


def _log_round(ctx: Context, number: int, side: str, result: _Round, extra: str) -> None:
    storm_ = result.storm
    p99 = _p(result.storm_ms, 99)
    quiet99 = _p(result.quiet_ms, 99)
    ctx.log(
        f"round {number} {side:7}: {storm_.accepted} logins in {storm_.seconds:.1f} s = {storm_.rate:.1f}/s "
        f"{extra}; delivery p99 {_ms(quiet99)} quiet, {_ms(p99)} during the storm "
        f"({len(result.storm_ms)} samples, {result.lost} lost) {storm_.failures}"
    )


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def _failures(rounds: list[_Round], side: str) -> list[str]:
    return [
        f"{side} round {n}: {r.storm.failures}; {r.lost} probe messages lost"
        for n, r in enumerate(rounds, 1)
        if r.storm.failures or r.lost
    ]
