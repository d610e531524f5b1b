"""Figure 7: broker memory with 2,000 idle authenticated connections, against amqtt anonymous."""

from __future__ import annotations

from tests.bench.brokers import BrokerProcess, BrokerSpec
from tests.bench.context import Context
from tests.bench.figures.common import free_port, mqttprov_settings, sqlite_url
from tests.bench.fleet import create_registry, make_fleet
from tests.bench.load import IdleResult, IdleTask, Login
from tests.bench.procs import LoadProcess
from tests.bench.results import FigureResult, Goal, Row, median

NAME = "memory"
TITLE = "memory at idle authenticated connections"
TIME_LIMIT = 180.0
#: The memory fleet's stored hashes use bcrypt cost 4: RSS does not depend on the cost, and
#: 2,000 logins at cost 10 would spend two minutes in bcrypt per round for nothing.
MEMORY_COST = 4
_CONCURRENCY = 50


def run(ctx: Context) -> FigureResult:
    """Fresh broker per round: RSS before, RSS with every connection open and idle; interleaved."""
    sizes = ctx.sizes
    count = sizes.memory_connections
    figure = FigureResult(NAME, TITLE)
    fleet = make_fleet(count, cost=MEMORY_COST)
    url = sqlite_url(ctx.workdir / "memory.db")
    create_registry(url, fleet)
    logins = fleet.logins()
    totals: dict[str, list[float]] = {"ours": [], "amqtt": []}
    per_connection: dict[str, list[float]] = {"ours": [], "amqtt": []}
    logs: list[str] = []
    for number in range(1, sizes.rounds + 1):
        for side in ("ours", "amqtt"):
            port = free_port()
            spec = (
                BrokerSpec("mqttprov", port, mqttprov_settings(url, port, cost=MEMORY_COST))
                if side == "ours"
                else BrokerSpec("amqtt-anonymous", port)
            )
            before, after, held = _measure(ctx, spec, logins, logs)
            totals[side].append(after / 1024)
            per_connection[side].append((after - before) / max(held.connected, 1))
            ctx.log(
                f"round {number} {side:5}: {held.connected} connections held "
                f"(opened in {held.seconds:.1f} s); RSS {before / 1024:.1f} MB before, "
                f"{after / 1024:.1f} MB with them = {per_connection[side][-1]:.1f} KiB per connection"
            )
            if held.connected != count:
                figure.notes.append(
                    f"round {number} {side}: only {held.connected} of {count} connected "
                    f"(refused {held.refused}, errors {held.errors})"
                )
    figure.rows += [
        Row(
            f"memory with {count:,} idle authenticated connections",
            "MB",
            median(totals["ours"]),
            median(totals["amqtt"]),
            "amqtt anonymous",
            Goal("ratio_at_most", 1.2),
            totals["ours"],
            totals["amqtt"],
        ),
        Row(
            "memory per connection",
            "KiB",
            median(per_connection["ours"]),
            median(per_connection["amqtt"]),
            "amqtt anonymous",
            Goal("ratio_at_most", 1.2),
            per_connection["ours"],
            per_connection["amqtt"],
        ),
    ]
    load = f"1 load process opening {count:,} connections, {_CONCURRENCY} at a time, keep-alive 600 s"
    figure.processes = {
        "mqttprov": f"broker: 1 fresh process per round; {load}",
        "amqtt anonymous": f"broker: 1 fresh process per round; {load}",
    }
    figure.sizes = {"connections": count, "rounds_per_side": sizes.rounds}
    figure.notes += [
        "RSS is VmRSS of the broker process (/proc/<pid>/status); per connection = (with - before) / count",
        f"stored hashes at bcrypt cost {MEMORY_COST} to keep set-up short (memory does not depend on it)",
        *logs,
    ]
    return figure


def _measure(
    ctx: Context, spec: BrokerSpec, logins: list[Login], logs: list[str]
) -> tuple[int, int, IdleResult]:
    with BrokerProcess(spec, ctx.workdir) as broker:
        before = broker.rss_kib()
        holder = LoadProcess(
            IdleTask(broker.port, tuple(logins), _CONCURRENCY, TIME_LIMIT), f"idle-{spec.kind}"
        )
        try:
            holder.expect("ready", 60.0)
            holder.send("go")
            held: IdleResult = holder.expect("holding", TIME_LIMIT + 30.0)
            after = broker.rss_kib()
            holder.send("release")
            holder.expect("result", 60.0)
        finally:
            holder.close()
    logs += broker.log_summary()
    return before, after, held
