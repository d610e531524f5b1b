"""Login storms through Mosquitto with dynamic security, against the same Mosquitto anonymous.

The devices are issued on the private node (tests/mosquitto_node.py, the configuration
docs/mosquitto.md describes) by :meth:`DynsecBridge.issued`, the call the provisioning worker
makes after each enrolment: a role holding the device's namespace, and a client bound to client
id = username. Each round runs, interleaved: a cold storm on a freshly started node (every device
logs in once), the same against a fresh anonymous Mosquitto, then a warm storm (reconnects) on
each. Mosquitto keeps no credential cache, so "warm" only means a process that has served the
fleet once already. Mosquitto's own CPU time per login is recorded on both sides: it shows what
dynamic security costs even when the load generators, not Mosquitto, limit the rate.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic

from broker.external.mosquitto.runtime import open_bridge
from config import Settings
from provisioning.external.link import parse_broker_url
from provisioning.registry import DeviceInfo, DeviceStatus
from tests.bench.brokers import Mosquitto, cpu_seconds
from tests.bench.context import Context
from tests.bench.figures.common import StormSummary, free_port, sqlite_url, storm
from tests.bench.figures.external import Side, cpu_row, load_average, load_note, storm_rows
from tests.bench.fleet import Fleet, make_fleet
from tests.bench.load import Login
from tests.bench.results import FigureResult
from tests.mosquitto_node import MosquittoNode, mosquitto_missing, mosquitto_node, stack_sections

NAME = "mosquitto-storm"
TITLE = "login storms through Mosquitto with dynamic security"
STORM_LIMIT = 120.0
#: dynamic-security commands in flight while issuing the fleet.
ISSUE_CONCURRENCY = 20


def run(ctx: Context) -> FigureResult:
    """Issue the fleet through the bridge, then interleaved cold and warm storms on both sides."""
    figure = FigureResult(NAME, TITLE)
    missing = mosquitto_missing()
    if missing is not None:
        figure.notes.append(f"Mosquitto with dynamic security is not available: {missing}; no rows")
        return figure
    sizes = ctx.sizes
    load_before = load_average()
    fleet = make_fleet(sizes.mosquitto_devices, cost=sizes.bcrypt_cost)
    logins = fleet.logins()
    reconnects = list(itertools.islice(itertools.cycle(logins), sizes.mosquitto_reconnects))
    ours, reference = Side("dynsec"), Side("anonymous")
    directory = ctx.workdir / NAME
    with mosquitto_node(directory / "dynsec") as node:
        settings = Settings.model_validate(stack_sections(node, sqlite_url(directory / "registry.db")))
        ctx.log(f"issuing {len(fleet.devices)} devices on dynamic security through the bridge")
        issue_seconds = asyncio.run(_issue(settings, fleet))
        ctx.log(f"issued in {issue_seconds:.1f} s ({len(fleet.devices) / issue_seconds:,.0f} devices/s)")
        for round_ in range(1, sizes.external_rounds + 1):
            node.stop()
            node.start()
            _measure(ctx, ours, "cold", round_, logins, port=node.device_port, pid=_pid(node))
            with _anonymous(directory) as anonymous:
                _measure(ctx, reference, "cold", round_, logins, port=anonymous.port, pid=anonymous.pid)
                _measure(ctx, ours, "warm", round_, reconnects, port=node.device_port, pid=_pid(node))
                _measure(ctx, reference, "warm", round_, reconnects, port=anonymous.port, pid=anonymous.pid)
        log_lines = node.log.count("\n")

    what = "Mosquitto dynamic security"
    figure.rows += storm_rows(what, ours, reference, "Mosquitto anonymous")
    figure.rows.append(cpu_row(what, ours, reference, "Mosquitto anonymous"))
    load = (
        f"{sizes.external_storm_processes} load process(es), "
        f"{sizes.storm_concurrency} concurrent raw-socket clients in all"
    )
    figure.processes = {
        "Mosquitto dynamic security": "broker: 1 Mosquitto process (restarted before each cold storm; "
        f"dynamic-security plugin, {len(fleet.devices)} clients and roles); {load}",
        "Mosquitto anonymous": f"broker: 1 Mosquitto process (a fresh one each round); {load}",
    }
    figure.sizes = {
        "devices": len(fleet.devices),
        "reconnects_per_round": len(reconnects),
        "rounds_per_side": sizes.external_rounds,
        "concurrency": sizes.storm_concurrency,
        "load_processes": sizes.external_storm_processes,
    }
    figure.notes += [
        (
            f"{len(fleet.devices)} devices issued through DynsecBridge.issued (role + client each, as "
            f"the worker does after an enrolment) in {issue_seconds:.1f} s, {ISSUE_CONCURRENCY} at a time"
        ),
        *ours.cpu_notes(),
        *reference.cpu_notes(),
        (
            "both Mosquittos log every connect and disconnect (connection_messages true); "
            f"the dynamic-security node's log ended with {log_lines} lines"
        ),
        *ours.problems,
        *reference.problems,
        load_note(load_before),
    ]
    return figure


async def _issue(settings: Settings, fleet: Fleet) -> float:
    """Issue every device on Mosquitto the way the worker does; the seconds it took."""
    now = datetime.now(UTC)
    hashes = fleet.hashes
    async with open_bridge(settings, parse_broker_url(settings.external.broker)) as bridge:
        await bridge.ensure_layout()
        gate = asyncio.Semaphore(ISSUE_CONCURRENCY)
        started = monotonic()

        async def issue(index: int) -> None:
            device = fleet.devices[index]
            info = DeviceInfo(
                id=device.id,
                mac=device.mac,
                mqtt_username=device.username,
                status=DeviceStatus.REGISTERED,
                firmware_version=None,
                sensor_types=[],
                created_at=now,
                updated_at=now,
                last_seen_at=None,
                activated_at=now,
                credentials_issued_at=now,
                note=None,
                has_credentials=True,
            )
            async with gate:
                await bridge.issued(info, device.password, hashes[device.password])

        await asyncio.gather(*(issue(n) for n in range(len(fleet.devices))))
        return monotonic() - started


@contextmanager
def _anonymous(directory: Path) -> Iterator[Mosquitto]:
    with Mosquitto(free_port(), directory, connection_messages=True) as mosquitto:
        yield mosquitto


def _pid(node: MosquittoNode) -> int:
    assert node.process is not None
    return node.process.pid


def _measure(
    ctx: Context, side: Side, kind: str, round_: int, logins: list[Login], *, port: int, pid: int
) -> None:
    """One storm; its rate and Mosquitto's CPU per login go to ``side``."""
    sizes = ctx.sizes
    cpu_before = cpu_seconds(pid)
    result: StormSummary = storm(
        port,
        logins,
        concurrency=sizes.storm_concurrency,
        processes=sizes.external_storm_processes,
        time_limit=STORM_LIMIT,
    )
    cpu_us = (cpu_seconds(pid) - cpu_before) * 1e6 / max(result.accepted, 1)
    side.record_cpu(kind, {"Mosquitto": cpu_us})
    side.record(ctx, kind, round_, result, f", Mosquitto CPU {cpu_us:.0f} µs/login")
