"""Figure 7: broker memory with 2,000 idle authenticated connections, against amqtt anonymous."""

from __future__ import annotations

from typing import Any

from tests.bench.context import Context
from tests.bench.figures.common import free_port, held_connections, mqttprov_settings, sqlite_url
from tests.bench.fleet import create_registry, make_fleet
from tests.bench.load import IdleResult, Login
from tests.bench.results import FigureResult, Goal, Row, median
from tests.bench.served import ServedBroker, ServedKind

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
            kind: ServedKind = "mqttprov" if side == "ours" else "amqtt-anonymous"
            settings = mqttprov_settings(url, port, cost=MEMORY_COST) if side == "ours" else None
            before, after, held = _measure(
                ctx, kind=kind, port=port, settings=settings, logins=logins, logs=logs
            )
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
        "mqttprov": f"broker: `mqttprov serve --config FILE`, 1 fresh process per round; {load}",
        "amqtt anonymous": f"broker: amqtt's `amqtt -c FILE`, 1 fresh process per round; {load}",
    }
    figure.sizes = {"connections": count, "rounds_per_side": sizes.rounds}
    figure.notes += [
        (
            "each broker started as its users start it (its command-line script); RSS is VmRSS of "
            "that process (/proc/<pid>/status) once it listens; per connection = (with - before) / count"
        ),
        f"stored hashes at bcrypt cost {MEMORY_COST} to keep set-up short (memory does not depend on it)",
        *logs,
    ]
    return figure


def _measure(
    ctx: Context,
    *,
    kind: ServedKind,
    port: int,
    settings: dict[str, Any] | None,
    logins: list[Login],
    logs: list[str],
) -> tuple[int, int, IdleResult]:
    with ServedBroker(kind, port, ctx.workdir, settings=settings) as broker:
        before = broker.rss_kib()
        with held_connections(
            broker.port, logins, concurrency=_CONCURRENCY, time_limit=TIME_LIMIT, name=f"idle-{kind}"
        ) as held:
            after = broker.rss_kib()
    logs += broker.log_summary()
    return before, after, held
