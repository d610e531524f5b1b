"""Figure: real devices' first logins, and provisioning, while another host floods bad CONNECTs.

The flood comes from 127.0.0.2 (another host to the broker): invented ``device_…`` usernames
and real usernames with wrong passwords, ``flood_concurrency`` in flight. Real devices log in
for the first time from 127.0.0.1 (provisioned, never logged in: a bcrypt check each) and
retry 1 s after CONNACK 3, as firmware does. The reference is the same number of other real
devices, and the same provisioning sessions, just before the flood starts.
"""

from __future__ import annotations

from tests.bench.context import Context
from tests.bench.figures.common import (
    FLEET_SECRET,
    describe_logins,
    free_port,
    mean_retries,
    mqttprov_settings,
    sqlite_url,
)
from tests.bench.fleet import create_registry, mac_for, make_fleet
from tests.bench.load import Login, ProvisionResult, ProvisionTask
from tests.bench.logins import FloodResult, FloodTask, RetryLoginResult, RetryLoginTask
from tests.bench.procs import BenchCrashError, LoadProcess, run_load
from tests.bench.results import FigureResult, Goal, Row, percentile
from tests.bench.served import ServedBroker

NAME = "flood"
TITLE = "first logins during a login flood"
FLOOD_SOURCE = "127.0.0.2"
#: "At most a couple" of CONNACK 3 retries for any real device.
MAX_RETRIES = 2
_MAC_PREFIX = 0x0A


def run(ctx: Context) -> FigureResult:
    """Reference phase (no flood), then the same with the flood running."""
    sizes = ctx.sizes
    cost, count = sizes.flood_cost, sizes.flood_devices
    figure = FigureResult(NAME, TITLE)
    fleet = make_fleet(2 * count, cost=cost)
    url = sqlite_url(ctx.workdir / "flood.db")
    create_registry(url, fleet)
    logins = fleet.logins()
    quiet_logins, flooded_logins = logins[:count], logins[count:]
    port = free_port()
    settings = mqttprov_settings(url, port, cost=cost, provisioning={"mode": "open"})
    macs = [mac_for(n, prefix=_MAC_PREFIX) for n in range(2 * sizes.flood_provisions)]
    with ServedBroker("mqttprov", port, ctx.workdir, settings=settings) as broker:
        quiet, quiet_provisioning = _phase(ctx, port, quiet_logins, macs[::2], "quiet")
        ctx.log(f"without the flood: {describe_logins(quiet)}; provisioning {quiet_provisioning.outcomes}")
        usernames = tuple(login.username or "" for login in logins)
        flood = LoadProcess(
            FloodTask(port, FLOOD_SOURCE, usernames, sizes.flood_concurrency, sizes.flood_seconds + 120.0),
            "flood",
        )
        try:
            flood.expect("ready", 60.0)
            flood.send("go")
            flood.expect("flooding", 60.0)
            during, provisioning = _phase(ctx, port, flooded_logins, macs[1::2], "flooded")
            flood.send("stop")
            flooded: FloodResult = flood.expect("result", 60.0)
        finally:
            flood.close()
        ctx.log(f"during the flood: {describe_logins(during)}; provisioning {provisioning.outcomes}")
        ctx.log(
            f"flood: {flooded.sent_per_second:,.0f} CONNECTs/s, {flooded.refusals_per_second:,.0f} "
            f"refusals/s {flooded.refused} {flooded.errors}"
        )
    if flooded.accepted:
        raise BenchCrashError(f"the broker accepted {flooded.accepted} CONNECTs of the flood")
    figure.rows += rows(
        count,
        quiet=quiet,
        during=during,
        flooded=flooded,
        quiet_provisioning=quiet_provisioning,
        provisioning=provisioning,
    )
    figure.notes += [
        f"without the flood: {describe_logins(quiet)}",
        f"during the flood: {describe_logins(during)}",
        (
            f"flood: {flooded.sent} CONNECTs; refusals by CONNACK code {flooded.refused}; client errors "
            f"{flooded.errors} (TimeoutError: dropped unanswered after {FloodTask.patience} s)"
        ),
        f"provisioning without the flood: {quiet_provisioning.outcomes}; during: {provisioning.outcomes}",
        *broker.log_summary(),
    ]
    if cost != 12:
        figure.notes.insert(0, f"stored hashes at bcrypt cost {cost} (quick size), not the default 12")
    figure.processes = {
        "flood": f"1 load process from {FLOOD_SOURCE}, {sizes.flood_concurrency} bad CONNECTs in flight, "
        "each dropped if unanswered after 0.25 s (half invented device usernames, half real usernames "
        "with wrong passwords)",
        "devices": f"1 load process from 127.0.0.1, {count} first logins at once, each retrying 1 s "
        "after CONNACK 3, for up to "
        f"{sizes.flood_seconds:.0f} s; 1 load process provisioning new MACs one at a time",
        "mqttprov": "broker: `mqttprov serve --config FILE`",
    }
    figure.sizes = {"devices": count, "flood_concurrency": sizes.flood_concurrency, "bcrypt_cost": cost}
    return figure


def _phase(
    ctx: Context, port: int, logins: list[Login], macs: list[str], label: str
) -> tuple[RetryLoginResult, ProvisionResult]:
    """The devices' first logins and a provisioning session at a time, side by side."""
    limit = ctx.sizes.flood_seconds
    devices = RetryLoginTask(port, tuple(logins), len(logins), limit)
    enrol = ProvisionTask(port, tuple(macs), 1, limit, "provision", FLEET_SECRET)
    logged_in, provisioned = run_load([devices, enrol], limit + 60.0, label=label)
    return logged_in, provisioned


def rows(
    count: int,
    *,
    quiet: RetryLoginResult,
    during: RetryLoginResult,
    flooded: FloodResult,
    quiet_provisioning: ProvisionResult,
    provisioning: ProvisionResult,
) -> list[Row]:
    """The figure's rows: devices in, their retries, login and provisioning times, flood rate."""
    quiet_p50 = _p50([ms for ms in quiet.latencies_ms if ms is not None])
    during_p50 = _p50([ms for ms in during.latencies_ms if ms is not None])
    return [
        Row(
            "flood: real devices in (first logins)",
            "devices",
            float(during.accepted),
            float(count),
            "devices trying",
            Goal("ratio_at_least", 1.0),
        ),
        Row(
            "flood: CONNACK 3 retries per real device, max",
            "retries",
            float(max(during.retries, default=0)),
            float(max(quiet.retries, default=0)),
            "without the flood",
            Goal("at_most", MAX_RETRIES, "retries"),
        ),
        Row(
            "flood: CONNACK 3 retries per real device, mean",
            "retries",
            mean_retries(during),
            mean_retries(quiet),
            "without the flood",
        ),
        Row("flood: first login p50 of real devices", "ms", during_p50, quiet_p50, "without the flood"),
        Row("flood: bad CONNECTs sent", "CONNECTs/s", flooded.sent_per_second),
        Row("flood: refusals of the flood (answered)", "refusals/s", flooded.refusals_per_second),
        Row(
            "flood: provisioning latency p50",
            "ms",
            _p50(provisioning.latencies_ms),
            _p50(quiet_provisioning.latencies_ms),
            "without the flood",
        ),
    ]


def _p50(values: list[float]) -> float | None:
    return percentile(values, 50) if values else None
