"""Figure: a burst of first boots enrolling at bcrypt cost 12, against the same burst at cost 4.

Each burst is ``enrol_devices`` new MACs asking for credentials over MQTT at once. Before each
burst both brokers are left alone until their idle-time work is done (the credential pool
filled): until the pool says it is full in the log, or the process goes idle (CPU).
"""

from __future__ import annotations

from tests.bench.context import Context
from tests.bench.figures.common import FLEET_SECRET, enrolment_settings, free_port, sqlite_url
from tests.bench.fleet import create_empty_registry, mac_for
from tests.bench.load import ProvisionResult, ProvisionTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median
from tests.bench.served import ServedBroker

NAME = "enrol-burst"
TITLE = "enrolment burst at cost 12 against cost 4"
REFERENCE_COST = 4
TIME_LIMIT = 180.0
#: How long a broker may take to fill its credential pool before a burst (cost 12, 1 worker:
#: 128 hashes took 35-50 s here).
IDLE_TIMEOUT = 180.0
POOL_FULL = b"credential pool full"
_MAC_PREFIX = 0x0C


def run(ctx: Context) -> FigureResult:
    """Both brokers running; per round, a burst at each cost, each after both brokers went idle."""
    sizes = ctx.sizes
    cost, count = sizes.enrol_cost, sizes.enrol_devices
    figure = FigureResult(NAME, TITLE)
    rates: dict[int, list[float]] = {cost: [], REFERENCE_COST: []}
    brokers: dict[int, ServedBroker] = {}
    offsets: dict[int, int] = {}
    try:
        for side_cost in (cost, REFERENCE_COST):
            brokers[side_cost] = _broker(ctx, side_cost)
            offsets[side_cost] = 0
        next_mac = 0
        for number in range(1, sizes.enrol_rounds + 1):
            for side_cost in (cost, REFERENCE_COST):
                for other_cost, other in brokers.items():
                    waited, how = other.wait_idle(IDLE_TIMEOUT, log_line=POOL_FULL, since=offsets[other_cost])
                    offsets[other_cost] = other.log_offset()  # the line is logged once per fill
                    ctx.log(f"round {number}: broker at cost {other_cost} settled ({how}) in {waited:.1f} s")
                    if how == "timeout":
                        figure.notes.append(f"round {number}: cost {other_cost} busy after {waited:.0f} s")
                macs = tuple(mac_for(next_mac + n, prefix=_MAC_PREFIX) for n in range(count))
                next_mac += count
                broker = brokers[side_cost]
                task = ProvisionTask(broker.port, macs, count, TIME_LIMIT, "provision", FLEET_SECRET)
                result: ProvisionResult
                (result,) = run_load([task], TIME_LIMIT + 60.0, label=f"enrol-{side_cost}")
                rate = result.outcomes.get("ok", 0) / max(result.ended - result.started, 1e-9)
                rates[side_cost].append(rate)
                ctx.log(
                    f"round {number} cost {side_cost:2}: {result.outcomes.get('ok', 0)} of {count} "
                    f"enrolled in {result.ended - result.started:.2f} s = {rate:,.1f}/s {result.outcomes}"
                )
                if set(result.outcomes) - {"ok"}:
                    figure.notes.append(f"round {number} cost {side_cost}: {result.outcomes}")
    finally:
        for broker in brokers.values():
            broker.stop()
    figure.rows.append(
        Row(
            f"enrolment burst, {count} first boots at cost {cost}",
            "devices/s",
            median(rates[cost]),
            median(rates[REFERENCE_COST]),
            f"the same burst at cost {REFERENCE_COST}",
            Goal("ratio_at_least", 0.5),
            rates[cost],
            rates[REFERENCE_COST],
        )
    )
    if cost != 12:
        figure.notes.insert(0, f"cost {cost} against {REFERENCE_COST} (quick size), not the default 12")
    figure.processes = {
        f"cost {cost}": "broker: `mqttprov serve --config FILE`; 1 load process, every MAC at once",
        f"cost {REFERENCE_COST}": "the same, in its own broker process and database",
    }
    figure.sizes = {"devices_per_burst": count, "bursts_per_side": sizes.enrol_rounds, "bcrypt_cost": cost}
    for broker in brokers.values():
        figure.notes += broker.log_summary()
    return figure


def _broker(ctx: Context, cost: int) -> ServedBroker:
    url = sqlite_url(ctx.workdir / f"enrol-burst-{cost}.db")
    create_empty_registry(url)
    port = free_port()
    return ServedBroker("mqttprov", port, ctx.workdir, settings=enrolment_settings(url, port, cost=cost))
