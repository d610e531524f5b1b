"""Figure: the login rate after a broker restart, against a warm reconnect storm just before it.

N devices, every one logged in at least once, are connected to ``mqttprov serve``; the
broker is stopped with SIGTERM and started again on the same database and files, and every
device reconnects. What a process keeps in memory alone (the verified-credential cache) is
gone after the restart; what it keeps in the registry or beside it is not.

Every device's first bcrypt check is taken as done (the cold-storm figure measures those): the
bench stores each credential's verifier, made with the broker's key, before the broker first
starts, so that the fleet can be large enough for a storm to last longer than the noise.
"""

from __future__ import annotations

import asyncio
import uuid

from auth_plugin.principals import credential_tag
from auth_plugin.verifiers import VerifierKey
from provisioning.registry import create_engine
from provisioning.registry.verifiers import VerifierStore
from tests.bench.context import Context
from tests.bench.figures.common import (
    describe_logins,
    device_logins,
    free_port,
    held_connections,
    mqttprov_settings,
    sqlite_url,
)
from tests.bench.fleet import Fleet, create_registry, make_fleet
from tests.bench.load import IdleResult, Login
from tests.bench.results import FigureResult, Goal, Row, median
from tests.bench.served import ServedBroker

NAME = "restart-storm"
TITLE = "login rate after a broker restart"
DEFAULT_COST = 12
#: Seconds the devices of one storm keep trying (cold logins at cost 12 take most of it).
TIME_LIMIT = 600.0


def run(ctx: Context) -> FigureResult:
    """Warm-up, then per round: warm storm, hold everyone, restart, everyone reconnects."""
    sizes = ctx.sizes
    cost, count = sizes.restart_cost, sizes.restart_devices
    concurrency = sizes.storm_concurrency
    figure = FigureResult(NAME, TITLE)
    ctx.log(f"creating {count} devices (bcrypt cost {cost})")
    fleet = make_fleet(count, cost=cost)
    url = sqlite_url(ctx.workdir / "restart-storm.db")
    create_registry(url, fleet)
    key = f"restart-storm-{uuid.uuid4().hex}"
    asyncio.run(_store_verifiers(url, fleet, key))
    logins = fleet.logins()
    port = free_port()
    warm_rates: list[float] = []
    after_rates: list[float] = []
    settings = mqttprov_settings(url, port, cost=cost, auth={"verifier_key": key})
    with ServedBroker("mqttprov", port, ctx.workdir, settings=settings) as broker:
        first = device_logins(port, logins, concurrency=concurrency, time_limit=TIME_LIMIT, label="first")
        ctx.log(f"first logins (verifiers stored by the bench): {describe_logins(first)}")
        figure.notes.append(f"first logins, verifiers stored by the bench: {describe_logins(first)}")
        for number in range(1, sizes.restart_rounds + 1):
            warm = device_logins(port, logins, concurrency=concurrency, time_limit=TIME_LIMIT, label="warm")
            warm_rates.append(warm.rate)
            ctx.log(f"round {number} warm storm: {describe_logins(warm)}")
            held, stop_seconds, start_seconds = _restart_while_connected(broker, logins, concurrency)
            ctx.log(
                f"round {number}: {held.connected} devices connected; SIGTERM to exit {stop_seconds:.2f} s, "
                f"start to listening {start_seconds:.2f} s"
            )
            after = device_logins(port, logins, concurrency=concurrency, time_limit=TIME_LIMIT, label="after")
            after_rates.append(after.rate)
            ctx.log(f"round {number} after the restart: {describe_logins(after)}")
            figure.notes += [
                (
                    f"round {number}: {held.connected} of {count} connected at the restart; stopped in "
                    f"{stop_seconds:.2f} s, listening again {start_seconds:.2f} s later"
                ),
                f"round {number} warm storm: {describe_logins(warm)}",
                f"round {number} after the restart: {describe_logins(after)}",
            ]
    figure.rows.append(
        Row(
            f"login rate after a restart, {count:,} devices (cost {cost})",
            "logins/s",
            median(after_rates),
            median(warm_rates),
            "warm reconnect storm just before",
            Goal("ratio_at_least", 0.8),
            after_rates,
            warm_rates,
        )
    )
    if cost != DEFAULT_COST:
        figure.notes.insert(
            0, f"stored hashes at bcrypt cost {cost} (quick size), not the default {DEFAULT_COST}"
        )
    load = f"1 load process, {min(concurrency, count)} devices at a time, each retrying 1 s after CONNACK 3"
    figure.processes = {
        "mqttprov": f"broker: `mqttprov serve --config FILE`, restarted (SIGTERM) on the same files; {load}",
        "reference": "the same broker and devices, a warm reconnect storm just before each restart",
    }
    figure.sizes = {"devices": count, "restarts": sizes.restart_rounds, "bcrypt_cost": cost}
    figure.notes += broker.log_summary()
    return figure


def _restart_while_connected(
    broker: ServedBroker, logins: list[Login], concurrency: int
) -> tuple[IdleResult, float, float]:
    """Connect every device and keep it connected while the broker restarts."""
    with held_connections(
        broker.port, logins, concurrency=concurrency, time_limit=TIME_LIMIT, name="restart-hold"
    ) as held:
        stop_seconds, start_seconds = broker.restart()
    return held, stop_seconds, start_seconds


async def _store_verifiers(url: str, fleet: Fleet, key: str) -> None:
    """Each device's verifier, as the broker stores it after a first bcrypt check."""
    verifier_key = VerifierKey(key.encode("ascii"))
    made = []
    for device in fleet.devices:
        hashed = fleet.hashes[device.password]
        made.append(
            (
                device.username,
                hashed,
                verifier_key.make(device.username, hashed, credential_tag(hashed), device.password),
            )
        )
    engine = create_engine(url)
    try:
        store = VerifierStore(engine)
        for start in range(0, len(made), 500):
            await store.save_many(made[start : start + 500])
    finally:
        await engine.dispose()
