"""Figure 4: provisioning rate of distinct MACs at bcrypt cost 10, against the hash bound."""

from __future__ import annotations

from tests.bench.brokers import BrokerProcess, BrokerSpec
from tests.bench.context import Context
from tests.bench.figures.common import FLEET_SECRET, enrolment_settings, free_port, sqlite_url
from tests.bench.fleet import create_empty_registry, mac_for, seconds_per_hash
from tests.bench.load import ProvisionResult, ProvisionTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median

NAME = "provisioning"
TITLE = "provisioning rate"
TIME_LIMIT = 180.0
#: Distinct MAC prefix per figure, so a shared registry could never mix them up.
_MAC_PREFIX = 0x06


def run(ctx: Context) -> FigureResult:
    """Rounds of distinct new MACs enrolling over MQTT (open mode, fleet secret), 50 at a time."""
    sizes = ctx.sizes
    cost = sizes.bcrypt_cost
    figure = FigureResult(NAME, TITLE)
    url = sqlite_url(ctx.workdir / "provisioning.db")
    create_empty_registry(url)
    port = free_port()
    settings = enrolment_settings(url, port, cost=cost)
    rates: list[float] = []
    bounds: list[float] = []
    hashes_ms: list[float] = []
    outcomes: list[str] = []
    workers = 0
    with BrokerProcess(BrokerSpec("mqttprov", port, settings), ctx.workdir) as broker:
        workers = int(broker.stats()["bcrypt_workers"])
        for number in range(1, sizes.rounds + 1):
            one_hash = seconds_per_hash(cost)
            hashes_ms.append(one_hash * 1000)
            bounds.append(workers / one_hash)
            first = (number - 1) * sizes.provision_devices
            macs = tuple(mac_for(first + n, prefix=_MAC_PREFIX) for n in range(sizes.provision_devices))
            task = ProvisionTask(
                port, macs, sizes.provision_concurrency, TIME_LIMIT, "provision", FLEET_SECRET
            )
            (result,) = run_load([task], TIME_LIMIT + 60.0, label="provision")
            rate = _rate(result)
            rates.append(rate)
            ctx.log(
                f"round {number}: {result.outcomes.get('ok', 0)} devices provisioned in "
                f"{result.ended - result.started:.1f} s = {rate:.1f}/s (bound {bounds[-1]:.1f}/s) "
                f"{result.outcomes}"
            )
            if set(result.outcomes) - {"ok"}:
                outcomes.append(f"round {number}: {result.outcomes}")
    figure.rows.append(
        Row(
            f"provisioning rate, distinct MACs (cost {cost})",
            "devices/s",
            median(rates),
            median(bounds),
            f"bcrypt hash bound, {workers} worker(s)",
            Goal("ratio_at_least", 0.8),
            rates,
            bounds,
        )
    )
    figure.processes = {
        "mqttprov": f"broker: 1 process (event loop + {workers} bcrypt worker threads); "
        f"1 load process with {sizes.provision_concurrency} concurrent provisioning sessions",
        "bound": "workers ÷ one bcrypt.hashpw at the same cost, measured in the bench process",
    }
    figure.sizes = {"devices_per_round": sizes.provision_devices, "rounds": sizes.rounds}
    figure.notes += [
        f"one bcrypt.hashpw at cost {cost} before each round: "
        + ", ".join(f"{ms:.1f} ms" for ms in hashes_ms),
        (
            "each session: CONNECT (MAC, fleet secret), SUBSCRIBE reply topic, PUBLISH request QoS 1, "
            "wait for the reply, DISCONNECT; per-address rate limit raised (all devices come from 127.0.0.1)"
        ),
        *outcomes,
        *broker.log_summary(),
    ]
    return figure


def _rate(result: ProvisionResult) -> float:
    return result.outcomes.get("ok", 0) / max(result.ended - result.started, 1e-9)
