"""Pieces several figures share: our broker's settings, free ports, the connect storms."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.load import IdleResult, IdleTask, Login, StormResult, StormTask
from tests.bench.logins import RetryLoginResult, RetryLoginTask
from tests.bench.procs import LoadProcess, run_load
from tests.bench.results import percentile
from tests.bench.served import ServedBroker

FLEET_SECRET = "bench-fleet-secret"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 1883)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != 1883:
            return port


def sqlite_url(path: Path) -> str:
    """The registry URL of a private SQLite file."""
    return f"sqlite+aiosqlite:///{path}"


def mqttprov_settings(
    database_url: str, port: int, *, cost: int, **sections: dict[str, Any]
) -> dict[str, Any]:
    """Our broker's settings on loopback: fleet-secret provisioning, defaults everywhere else."""
    settings: dict[str, Any] = {
        "broker": {"host": "127.0.0.1", "port": port},
        "database": {"url": database_url},
        "auth": {"bcrypt_cost": cost},
        "provisioning": {"mode": "allowlist", "auth": "fleet_secret", "fleet_secret": FLEET_SECRET},
    }
    for name, values in sections.items():
        settings[name] = settings.get(name, {}) | values
    return settings


def enrolment_settings(database_url: str, port: int, *, cost: int) -> dict[str, Any]:
    """Our broker's settings for enrolment figures: open mode, fleet secret, no per-address limit.

    Every device of the bench connects from 127.0.0.1: the per-address limit (meant for one
    misbehaving host) would otherwise decide the figure, not the hashing pipeline.
    """
    limits = {"mode": "open", "address_requests_per_minute": 1_000_000, "address_burst": 100_000}
    return mqttprov_settings(database_url, port, cost=cost, provisioning=limits)


@dataclass(frozen=True)
class StormSummary:
    """One storm against one broker: the rate and what went wrong, if anything."""

    rate: float
    accepted: int
    refused: dict[int, int]
    errors: dict[str, int]
    seconds: float
    started: float
    ended: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def failures(self) -> str:
        """A short description of refusals and errors ("" when none)."""
        parts = [f"{count} CONNACK {code}" for code, count in sorted(self.refused.items())]
        parts += [f"{count} {name}" for name, count in sorted(self.errors.items())]
        return ", ".join(parts)


def storm(
    port: int, logins: list[Login], *, concurrency: int, processes: int, time_limit: float
) -> StormSummary:
    """Run the connect storm from ``processes`` load processes; connects/s over the whole storm."""
    processes = max(1, min(processes, len(logins)))
    per_process = max(1, concurrency // processes)
    tasks = [StormTask(port, tuple(logins[n::processes]), per_process, time_limit) for n in range(processes)]
    results: list[StormResult] = run_load(list(tasks), time_limit + 60.0, label=f"storm-{port}")
    return summarize_storm(results)


def summarize_storm(results: list[StormResult]) -> StormSummary:
    """Aggregate the storm processes: accepted connects over the span from first start to last end."""
    started = min(r.started for r in results)
    ended = max(r.ended for r in results)
    accepted = sum(r.accepted for r in results)
    refused: dict[int, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    for result in results:
        for code, count in result.refused.items():
            refused[code] = refused.get(code, 0) + count
        for name, count in result.errors.items():
            errors[name] = errors.get(name, 0) + count
        latencies += result.latencies_ms
    seconds = max(ended - started, 1e-9)
    return StormSummary(
        rate=accepted / seconds,
        accepted=accepted,
        refused=refused,
        errors=errors,
        seconds=seconds,
        started=started,
        ended=ended,
        p50_ms=percentile(latencies, 50) if latencies else None,
        p99_ms=percentile(latencies, 99) if latencies else None,
    )


def device_logins(
    port: int, logins: Sequence[Login], *, concurrency: int, time_limit: float, label: str
) -> RetryLoginResult:
    """Every login until accepted (CONNACK 3: wait 1 s, try again), from one load process."""
    task = RetryLoginTask(port, tuple(logins), min(concurrency, len(logins)), time_limit)
    result: RetryLoginResult
    (result,) = run_load([task], time_limit + 60.0, label=label)
    return result


def describe_logins(result: RetryLoginResult) -> str:
    """One log line: how many got in, how fast, with how many CONNACK 3 retries, what went wrong."""
    head = (
        f"{result.accepted} of {len(result.retries)} in {result.ended - result.started:.2f} s "
        f"= {result.rate:,.1f}/s; CONNACK 3 retries max {max(result.retries, default=0)}, "
        f"mean {mean_retries(result):.2f}"
    )
    parts = [head]
    parts += [f"{count} CONNACK {code}" for code, count in sorted(result.refused.items())]
    parts += [f"{count} {name}" for name, count in sorted(result.errors.items())]
    return ", ".join(parts)


def mean_retries(result: RetryLoginResult) -> float:
    """CONNACK 3 retries per device, on average."""
    return sum(result.retries) / max(len(result.retries), 1)


@contextmanager
def held_connections(
    port: int,
    logins: Sequence[Login],
    *,
    concurrency: int,
    time_limit: float,
    name: str,
    topic_filters: Sequence[str] = (),
) -> Iterator[IdleResult]:
    """Every login connected (and subscribed to its filter, if any) by one load process during the block."""
    with held_on_each(
        [port], logins, concurrency=concurrency, time_limit=time_limit, name=name, topic_filters=topic_filters
    ) as (held,):
        yield held


@contextmanager
def held_on_each(
    ports: Sequence[int],
    logins: Sequence[Login],
    *,
    concurrency: int,
    time_limit: float,
    name: str,
    topic_filters: Sequence[str] = (),
    retry_delay: float | None = None,
) -> Iterator[list[IdleResult]]:
    """:func:`held_connections` on every broker of ``ports`` at once, a load process each.

    ``retry_delay``: a login told CONNACK 3 is tried again after it, as device firmware does.
    """
    holders: list[LoadProcess] = []
    try:
        for port in ports:
            task = IdleTask(
                port,
                tuple(logins),
                concurrency,
                time_limit,
                topic_filters=tuple(topic_filters),
                retry_delay=retry_delay,
            )
            holders.append(LoadProcess(task, f"{name}-{port}"))
        for holder in holders:
            holder.expect("ready", 60.0)
        for holder in holders:
            holder.send("go")
        yield [holder.expect("holding", time_limit + 30.0) for holder in holders]
        for holder in holders:
            holder.send("release")
        for holder in holders:
            holder.expect("result", 60.0)
    finally:
        for holder in holders:
            holder.close()


def served_side_by_side(
    stack: ExitStack, directory: Path, settings: Callable[[int], dict[str, Any]]
) -> dict[str, ServedBroker]:
    """``ours`` (``mqttprov serve``, ``settings`` for its port) and ``amqtt`` (amqtt's script, anonymous).

    Both started as their users start them, on free ports, and stopped when ``stack`` closes.
    """
    port = free_port()
    return {
        "ours": stack.enter_context(ServedBroker("mqttprov", port, directory, settings=settings(port))),
        "amqtt": stack.enter_context(ServedBroker("amqtt-anonymous", free_port(), directory)),
    }


def served_processes(load: str) -> dict[str, str]:
    """The processes of a figure run on :func:`served_side_by_side`'s brokers with ``load``."""
    return {
        "mqttprov": f"broker: `mqttprov serve --config FILE`; {load}",
        "amqtt (anonymous)": f"broker: amqtt's `amqtt -c FILE`; {load}",
    }
