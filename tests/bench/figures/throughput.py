"""Figure 5: publish throughput through the ACL (10 devices, each in its namespace, one subscriber each)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import ExitStack

from tests.bench.brokers import BrokerProcess, BrokerSpec
from tests.bench.context import Context
from tests.bench.figures.common import free_port, mqttprov_settings, sqlite_url
from tests.bench.fleet import create_registry, hash_password, make_fleet
from tests.bench.load import Login, Pair, PubSubResult, PubSubTask
from tests.bench.procs import run_load
from tests.bench.results import FigureResult, Goal, Row, median

NAME = "throughput"
TITLE = "publish throughput through the ACL"
TIME_LIMIT = 120.0


def run(ctx: Context) -> FigureResult:
    """Each device publishes QoS 0 as fast as the broker takes it; a service account per device receives."""
    sizes = ctx.sizes
    figure = FigureResult(NAME, TITLE)
    url = sqlite_url(ctx.workdir / "throughput.db")
    task_pairs = create_publishers([url], sizes.throughput_devices, sizes.bcrypt_cost)
    samples: dict[str, list[float]] = {"ours": [], "amqtt": []}
    with ExitStack() as stack:
        port = free_port()
        ours = stack.enter_context(
            BrokerProcess(
                BrokerSpec("mqttprov", port, mqttprov_settings(url, port, cost=sizes.bcrypt_cost)),
                ctx.workdir,
            )
        )
        reference = stack.enter_context(
            BrokerProcess(BrokerSpec("amqtt-anonymous", free_port()), ctx.workdir)
        )
        for number in range(1, sizes.rounds + 1):
            for side, broker in (("ours", ours), ("amqtt", reference)):
                task = PubSubTask(broker.port, task_pairs, sizes.throughput_messages, TIME_LIMIT)
                (result,) = run_load([task], TIME_LIMIT + 60.0, label=f"pubsub-{side}")
                rate = pubsub_rate(result)
                samples[side].append(rate)
                ctx.log(
                    f"round {number} {side:5}: {result.received} of {result.sent} messages delivered in "
                    f"{result.last_received - result.first_sent:.2f} s = {rate:,.0f} msg/s"
                )
                if result.received < result.sent:
                    figure.notes.append(
                        f"round {number} {side}: {result.sent - result.received} messages missing"
                    )
    figure.rows.append(
        Row(
            f"publish throughput through the ACL ({sizes.throughput_devices} devices)",
            "msg/s",
            median(samples["ours"]),
            median(samples["amqtt"]),
            "amqtt, no topic plugin",
            Goal("ratio_at_least", 0.9),
            samples["ours"],
            samples["amqtt"],
        )
    )
    load = (
        f"1 load process: {sizes.throughput_devices} publishers + {sizes.throughput_devices} subscribers, "
        "QoS 0, 48-byte payloads"
    )
    figure.processes = {
        "mqttprov": f"broker: 1 process; {load}",
        "amqtt (no topic plugin)": f"broker: 1 process, anonymous; {load}",
    }
    figure.sizes = {
        "devices": sizes.throughput_devices,
        "messages_per_device": sizes.throughput_messages,
        "rounds_per_side": sizes.rounds,
    }
    figure.notes += [*ours.log_summary(), *reference.log_summary()]
    return figure


def create_publishers(urls: Sequence[str], count: int, cost: int) -> tuple[Pair, ...]:
    """Registries at ``urls``, each with the same ``count`` devices and an account subscribed to each."""
    fleet = make_fleet(count, cost=cost)
    password = f"bench-subscriber-{uuid.uuid4().hex}"
    hashed = hash_password(password, cost)
    pairs: list[Pair] = []
    accounts: list[tuple[str, str, list[dict[str, str]]]] = []
    for n, device in enumerate(fleet.devices):
        account = f"benchsub{n}"
        accounts.append((account, hashed, [{"action": "subscribe", "filter": device.namespace + "#"}]))
        pairs.append(
            Pair(
                device.login,
                device.namespace + "telemetry",
                Login(account, account, password),
                device.namespace + "#",
            )
        )
    for url in urls:
        create_registry(url, fleet, accounts)
    return tuple(pairs)


def pubsub_rate(result: PubSubResult) -> float:
    return result.received / max(result.last_received - result.first_sent, 1e-9)
