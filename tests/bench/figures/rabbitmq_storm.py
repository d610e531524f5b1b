"""Login storms through a private two-node RabbitMQ cluster: ``mqttprov authd`` versus internal users.

One cluster (tests/rabbitmq_cluster.py) serves both sides; only the authentication backend
changes between storms, switched on both nodes at run time (``application:set_env`` of
``auth_backends``, which RabbitMQ reads at every login): ``rabbit_auth_backend_http`` asking a
real ``mqttprov authd`` process, ``rabbit_auth_backend_internal`` with the same usernames and
passwords created as RabbitMQ users, or ``rabbit_auth_backend_cache`` (RabbitMQ's own plugin) in
front of the HTTP backend. Each round starts authd fresh with a new verifier key and runs,
interleaved with the same storm against internal users: a cold storm (every device logs in
once: bcrypt), a warm storm (reconnects), then authd restarted on the same registry and key and
the warm storm again (after-restart: the first login of each device is a stored verifier's
HMAC, not bcrypt). Then, for each auth-cache TTL, a warm storm through the cache, authd
restarted, and the same storm again. The storm is split over both nodes. authd's request
latency and its password checks (bcrypt, verifier, in-memory cache) come from ``/metrics``, read
before and after each storm.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from provisioning.passwords import default_workers
from tests.authd_support import SECRET, authd_process, write_authd_config
from tests.bench.brokers import cpu_seconds
from tests.bench.context import Context
from tests.bench.figures.common import StormSummary, free_port, sqlite_url, summarize_storm
from tests.bench.figures.external import (
    STORM_GOAL,
    Side,
    cpu_row,
    load_average,
    load_note,
    login_latency_rows,
    storm_rows,
)
from tests.bench.fleet import create_registry, make_fleet, seconds_per_check
from tests.bench.load import Login, StormResult, StormTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median
from tests.rabbitmq_cluster import Cluster, rabbitmq_cluster, rabbitmq_missing

NAME = "rabbitmq-storm"
TITLE = "login storms through RabbitMQ with mqttprov authd"
STORM_LIMIT = 120.0
HTTP_BACKEND = "rabbit_auth_backend_http"
INTERNAL_BACKEND = "rabbit_auth_backend_internal"
CACHE_BACKEND = "rabbit_auth_backend_cache"
#: The storm kind after an authd restart.
AFTER = "after-restart"
#: TTLs of RabbitMQ's auth cache measured: 1 s, short enough for the revocation promise
#: (docs/scaling-out.md), and RabbitMQ's default, 15 s.
CACHE_TTLS_MS = (1_000, 15_000)
#: authd's password checks, by how they were answered.
_CHECKS = re.compile(r"^mqttprov_authd_(bcrypt_checks|verifier_checks|cache_hits)_total (\d+)(?:\.0)?$")
#: authd's latency histogram for the RabbitMQ contract, one line per bucket.
_BUCKET = re.compile(
    r'^mqttprov_authd_request_seconds_bucket\{contract="rabbitmq",le="([^"]+)"\} (\d+)(?:\.0)?$'
)


@dataclass
class _Ours(Side):
    """Our side, with authd's latency per storm kind: [(p50 ms, p99 ms, requests per login)],
    what answered its password checks in each storm, and how long each restart took."""

    latency: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)


def run(ctx: Context) -> FigureResult:
    """Start the cluster, create both sides' users, then interleaved rounds (see the module doc)."""
    figure = FigureResult(NAME, TITLE)
    missing = rabbitmq_missing()
    if missing is not None:
        figure.notes.append(f"RabbitMQ is not available: {missing}; no rows")
        return figure
    sizes = ctx.sizes
    load_before = load_average()
    cost = sizes.bcrypt_cost
    directory = ctx.workdir / NAME
    (directory / "cluster").mkdir(parents=True)
    ctx.log(f"creating {sizes.rabbitmq_devices} devices (bcrypt cost {cost})")
    fleet = make_fleet(sizes.rabbitmq_devices, cost=cost)
    url = sqlite_url(directory / "registry.db")
    create_registry(url, fleet)
    logins = fleet.logins()
    reconnects = list(itertools.islice(itertools.cycle(logins), sizes.rabbitmq_reconnects))
    port = free_port()
    # The secret as the password of the URL's user info: RabbitMQ sends it as HTTP basic auth.
    cluster = Cluster(
        directory / "cluster",
        f"http://rabbitmq:{SECRET}@127.0.0.1:{port}",
        auth_cache_ttl_ms=CACHE_TTLS_MS[0],
    )
    ours, reference = _Ours("authd"), Side("internal")
    checks_ms: list[float] = []
    # authd runs with [auth] bcrypt_workers unset: the default pool size.
    workers = default_workers()
    ctx.log("starting the two-node RabbitMQ cluster")
    with rabbitmq_cluster(cluster):
        ctx.log(f"creating {len(logins)} RabbitMQ internal users")
        cluster.ctl(cluster.nodes[0], "eval", add_users_expression(logins))
        for round_ in range(1, sizes.external_rounds + 1):
            checks_ms.append(seconds_per_check(cost) * 1000)
            # A new verifier key each round: its cold storm is a bcrypt check for every device
            # (verifiers made under another key are never used); its restarts keep the key.
            config = write_authd_config(
                directory / f"mqttprov-{round_}.toml",
                url,
                port,
                auth={"bcrypt_cost": cost, "verifier_key": secrets.token_hex(32)},
                contracts=["rabbitmq"],
            )
            with _Authd(config, port, directory) as authd:
                _round(
                    ctx, cluster, authd, sides=(ours, reference), round_=round_, storms=(logins, reconnects)
                )
    what = "RabbitMQ + authd"
    figure.rows += storm_rows(what, ours, reference, "RabbitMQ internal users")
    figure.rows.append(
        _versus_internal(f"after-restart login storm, {what}", ours, reference, AFTER, STORM_GOAL)
    )
    for ttl in CACHE_TTLS_MS:
        for kind in ("warm", AFTER):
            label = f"{kind} login storm, RabbitMQ + auth cache ({ttl / 1000:g} s) + authd"
            figure.rows.append(_versus_internal(label, ours, reference, _cached(kind, ttl), None))
    bounds = [workers * 1000 / ms for ms in checks_ms]
    cold = ours.rates.get("cold", [])
    figure.rows.append(
        Row(
            f"cold login storm through authd (bcrypt cost {cost})",
            "logins/s",
            median(cold),
            median(bounds),
            f"bcrypt bound, {workers} worker(s)",
            Goal("ratio_at_least", 0.8),
            cold,
            bounds,
        )
    )
    figure.rows += latency_rows(ours.latency)
    figure.rows += login_latency_rows(ours, reference, "RabbitMQ internal users")
    figure.rows.append(cpu_row(what, ours, reference, "RabbitMQ internal users"))
    after_cpu = cpu_row(what, ours, reference, "RabbitMQ internal users", kind=AFTER)
    # Internal users have no restart: their warm storms are the reference.
    after_cpu.reference_samples = reference.cpu_total_us.get("warm", [])
    after_cpu.reference = median(after_cpu.reference_samples)
    figure.rows.append(after_cpu)
    load = (
        f"{max(2, sizes.external_storm_processes)} load processes split over both nodes, "
        f"{sizes.rabbitmq_cold_concurrency} (cold) or {sizes.storm_concurrency} (other storms) "
        "concurrent raw-socket clients in all"
    )
    figure.processes = {
        "RabbitMQ + authd": "broker: 2 RabbitMQ nodes (one Erlang VM each) + 1 `mqttprov authd` process "
        f"(fresh each round, restarted within it: event loop + bcrypt worker threads); {load}",
        "RabbitMQ internal users": f"broker: the same 2 RabbitMQ nodes; {load}",
    }
    figure.sizes = {
        "devices": len(logins),
        "reconnects_per_round": len(reconnects),
        "rounds_per_side": sizes.external_rounds,
        "concurrency": sizes.storm_concurrency,
        "cold_concurrency": sizes.rabbitmq_cold_concurrency,
        "load_processes": sizes.external_storm_processes,
    }
    figure.notes += [
        f"one bcrypt check at cost {cost}, measured in the bench process before each round: "
        + ", ".join(f"{ms:.1f} ms" for ms in checks_ms),
        (
            "each round: authd started fresh with a new verifier key; cold then warm storm through "
            "authd, each followed by the same storm against internal users; authd restarted (SIGTERM, "
            "started again on the same registry and key) and the warm storm again (after-restart), "
            "then once more against internal users; then, per auth-cache TTL, the warm storm through "
            "RabbitMQ's rabbitmq_auth_backend_cache in front of authd, authd restarted, and the same "
            "storm again (RabbitMQ's cache survives an authd restart; entries older than the TTL do "
            "not). The internal-user reference of the after-restart and cache rows is every warm "
            "storm against internal users in the run"
        ),
        (
            "authd latency from its /metrics histogram (buckets 1, 2.5, 5, 10, 25, 50, 100 ms, ..., "
            "2.5 s, 5 s), interpolated within a bucket as Prometheus' histogram_quantile does: a p99 "
            "in the (2.5 s, 5 s] bucket is a rough figure. Each login makes two requests, the user "
            "check (bcrypt when cold) and the vhost check (no bcrypt): the cold p50 mixes the two"
        ),
        "authd requests per login: "
        + ", ".join(f"{kind} {r:.1f}" for kind, samples in ours.latency.items() for _, _, r in samples),
        *ours.checks,
        *ours.restarts,
        *ours.cpu_notes(),
        *reference.cpu_notes(),
        (
            "internal users: created with rabbit_auth_backend_internal:add_user/3 and set_permissions/6 "
            "(what `rabbitmqctl add_user` and `set_permissions` call) in one `rabbitmqctl eval`"
        ),
        *ours.problems,
        *reference.problems,
        load_note(load_before),
    ]
    return figure


def _round(
    ctx: Context,
    cluster: Cluster,
    authd: _Authd,
    *,
    sides: tuple[_Ours, Side],
    round_: int,
    storms: tuple[list[Login], list[Login]],
) -> None:
    """One round of storms on a freshly started authd (see the module doc)."""
    ours, reference = sides
    logins, reconnects = storms

    def through_authd(kind: str, which: list[Login], backend: str = HTTP_BACKEND) -> None:
        _use_backend(cluster, backend)
        _measure(ctx, cluster, ours, (kind, round_), which, authd=authd)

    def internal(kind: str, which: list[Login]) -> None:
        _use_backend(cluster, INTERNAL_BACKEND)
        _measure(ctx, cluster, reference, (kind, round_), which, authd=None)

    for kind, which in (("cold", logins), ("warm", reconnects)):
        through_authd(kind, which)
        internal(kind, which)
    ours.restarts.append(f"round {round_}: {authd.restart()}")
    through_authd(AFTER, reconnects)
    internal("warm", reconnects)
    for ttl in CACHE_TTLS_MS:
        _use_auth_cache(cluster, ttl)
        through_authd(_cached("warm", ttl), reconnects, CACHE_BACKEND)
        ours.restarts.append(f"round {round_}, auth cache {ttl} ms: {authd.restart()}")
        through_authd(_cached(AFTER, ttl), reconnects, CACHE_BACKEND)
    _use_backend(cluster, HTTP_BACKEND)


def _cached(kind: str, ttl_ms: int) -> str:
    return f"{kind}, auth cache {ttl_ms / 1000:g} s"


def _versus_internal(label: str, ours: Side, reference: Side, kind: str, goal: Goal | None) -> Row:
    """Our ``kind`` storms against every warm storm on internal users in the run."""
    return Row(
        label,
        "logins/s",
        median(ours.rates.get(kind, [])),
        median(reference.rates.get("warm", [])),
        "RabbitMQ internal users",
        goal,
        ours.rates.get(kind, []),
        reference.rates.get("warm", []),
    )


class _Authd:
    """The figure's ``mqttprov authd`` process: started, and restarted on the same config (and so
    the same registry and verifier key) with SIGTERM and a new start. A context manager."""

    def __init__(self, config: Path, port: int, directory: Path) -> None:
        self.config, self.port, self.directory = config, port, directory
        self.url = f"http://127.0.0.1:{port}"
        self.pid = 0
        self._starts = 0
        self._stack = ExitStack()

    def _start(self) -> None:
        self._starts += 1
        # One folder per start: authd_process names its log after the port, which stays the same.
        cwd = self.directory / f"{self.config.stem}-start-{self._starts}"
        cwd.mkdir()
        self.url = self._stack.enter_context(authd_process(self.config, self.port, cwd))
        self.pid = _pid_of(self.config)

    def restart(self) -> str:
        """SIGTERM, wait for the exit, start again until /healthz answers; how long each took."""
        started = time.perf_counter()
        self._stack.close()
        stopped = time.perf_counter()
        self._stack = ExitStack()
        self._start()
        again = time.perf_counter() - stopped
        return f"authd stopped in {stopped - started:.2f} s, healthy again {again:.2f} s later"

    def __enter__(self) -> Self:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def add_users_expression(logins: Sequence[Login]) -> str:
    """An Erlang expression for ``rabbitmqctl eval``: each login as an internal user with full
    permissions on ``/`` (usernames and passwords of the bench fleet need no escaping)."""
    for login in logins:
        for text in (login.username or "", login.password or ""):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
                raise ValueError("a bench username or password with characters that need escaping")
    users = ", ".join(f'{{<<"{login.username}">>, <<"{login.password}">>}}' for login in logins)
    actor = '<<"mqttprov-bench">>'
    return (
        f"[begin ok = rabbit_auth_backend_internal:add_user(U, P, {actor}), "
        f'ok = rabbit_auth_backend_internal:set_permissions(U, <<"/">>, <<".*">>, <<".*">>, <<".*">>, '
        f"{actor}) end || {{U, P}} <- [{users}]], ok."
    )


def _use_backend(cluster: Cluster, module: str) -> None:
    expression = f"rpc:multicall(application, set_env, [rabbit, auth_backends, [{module}]])."
    out = cluster.ctl(cluster.nodes[0], "eval", expression)
    if "[ok,ok]" not in out.replace(" ", ""):
        raise RuntimeError(f"switching the auth backend to {module}: {out}")


def _pid_of(config: Path) -> int:
    """The ``mqttprov authd --config CONFIG`` process (ours: started by authd_process)."""
    needle = str(config).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"authd" in cmdline and needle in cmdline:
                return int(entry.name)
    raise RuntimeError(f"no authd process with {config}")


def _node_pids(cluster: Cluster) -> list[int]:
    return [int((node.directory / "rabbitmq.pid").read_text().strip()) for node in cluster.nodes]


def _storm(cluster: Cluster, logins: list[Login], ctx: Context, concurrency: int) -> StormSummary:
    """The storm split over both nodes: one load process (or more) per node."""
    processes = max(2, ctx.sizes.external_storm_processes)
    per_process = max(1, concurrency // processes)
    tasks = [
        StormTask(cluster.nodes[n % 2].mqtt_port, tuple(logins[n::processes]), per_process, STORM_LIMIT)
        for n in range(processes)
    ]
    results: list[StormResult] = run_load(list(tasks), STORM_LIMIT + 60.0, label="rabbitmq-storm")
    return summarize_storm(results)


def _use_auth_cache(cluster: Cluster, ttl_ms: int) -> None:
    """Set the auth cache's TTL on both nodes and empty it (nothing cached under another TTL)."""
    # The cache's ETS table is private to its server: empty it from inside (its state's first field).
    clear = "fun(S) -> ets:delete_all_objects(element(2, S)), S end"
    expression = (
        f"rpc:multicall(application, set_env, [rabbitmq_auth_backend_cache, cache_ttl, {ttl_ms}]), "
        f"rpc:multicall(sys, replace_state, [rabbit_auth_cache_ets, {clear}])."
    )
    out = cluster.ctl(cluster.nodes[0], "eval", expression)
    if "badrpc" in out:
        raise RuntimeError(f"setting up the auth cache: {out}")


def _measure(
    ctx: Context,
    cluster: Cluster,
    side: Side,
    storm_id: tuple[str, int],
    logins: list[Login],
    *,
    authd: _Authd | None,
) -> None:
    """One storm (kind, round); its rate, CPU per login and (ours) authd's latency go to ``side``."""
    kind, round_ = storm_id
    pids = dict(zip(("node a", "node b"), _node_pids(cluster), strict=True))
    if authd is not None:
        pids["authd"] = authd.pid
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before = _metrics(authd.url) if authd is not None else ""
    sizes = ctx.sizes
    concurrency = sizes.rabbitmq_cold_concurrency if kind == "cold" else sizes.storm_concurrency
    # Never more at once than there are devices: RabbitMQ would take over a live client id.
    concurrency = min(concurrency, sizes.rabbitmq_devices)
    result = _storm(cluster, logins, ctx, concurrency)
    logins_done = max(result.accepted, 1)
    side.record_cpu(
        kind, {n: (cpu_seconds(pid) - cpu_before[n]) * 1e6 / logins_done for n, pid in pids.items()}
    )
    extra = ""
    if authd is not None and isinstance(side, _Ours):
        after = _metrics(authd.url)
        delta = bucket_delta(parse_buckets(before), parse_buckets(after))
        count = delta.get(float("inf"), 0)
        p50, p99 = histogram_quantile(delta, 0.5), histogram_quantile(delta, 0.99)
        if p50 is not None and p99 is not None:
            side.latency.setdefault(kind, []).append((p50 * 1000, p99 * 1000, count / logins_done))
            extra = f", authd p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms over {count} requests"
        checks = parse_checks(after)
        answered = ", ".join(f"{checks[n] - parse_checks(before).get(n, 0)} {n}" for n in sorted(checks))
        side.checks.append(f"round {round_} {kind}: authd password checks: {answered or 'none'}")
        extra += f" ({answered})"
    side.record(ctx, kind, round_, result, extra)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def parse_checks(text: str) -> dict[str, int]:
    """authd's password-check counters in a /metrics text: bcrypt_checks, verifier_checks, cache_hits."""
    return {m[1]: int(m[2]) for line in text.splitlines() if (m := _CHECKS.match(line))}


def read_buckets(url: str) -> dict[float, int]:
    """authd's cumulative latency buckets for the RabbitMQ contract: upper bound (s) -> count."""
    return parse_buckets(_metrics(url))


def parse_buckets(text: str) -> dict[float, int]:
    """The cumulative ``request_seconds`` buckets of contract ``rabbitmq`` in a /metrics text."""
    buckets: dict[float, int] = {}
    for line in text.splitlines():
        match = _BUCKET.match(line)
        if match:
            bound = float("inf") if match[1] == "+Inf" else float(match[1])
            buckets[bound] = int(match[2])
    return buckets


def bucket_delta(before: dict[float, int], after: dict[float, int]) -> dict[float, int]:
    """What was observed between two readings of the cumulative buckets."""
    return {bound: count - before.get(bound, 0) for bound, count in after.items()}


def histogram_quantile(buckets: dict[float, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of cumulative buckets, interpolated linearly within its bucket
    (Prometheus' ``histogram_quantile``); the highest finite bound when it falls past it."""
    total = buckets.get(float("inf"), 0)
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for bound in sorted(buckets):
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def latency_rows(latency: dict[str, list[tuple[float, float, float]]]) -> list[Row]:
    """authd's p50 and p99 per storm kind: the median over the rounds (no goal in issue 8)."""
    rows: list[Row] = []
    for kind, samples in latency.items():
        for label, index in (("p50", 0), ("p99", 1)):
            values = [sample[index] for sample in samples]
            rows.append(
                Row(
                    f"authd request {label} during the {kind} storm",
                    "ms",
                    median(values),
                    ours_samples=values,
                )
            )
    return rows
