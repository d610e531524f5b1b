"""What the external-broker figures (Mosquitto, RabbitMQ) share: per-side samples and their rows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.context import Context
from tests.bench.figures.common import StormSummary
from tests.bench.results import Goal, Row, median

KINDS = ("cold", "warm")
#: The goal of every external-broker storm against its reference (issue 8).
STORM_GOAL = Goal("ratio_at_least", 0.8)


@dataclass
class Side:
    """One side's storms: rates by kind (cold, warm), CPU per login by kind, what went wrong."""

    label: str
    rates: dict[str, list[float]] = field(default_factory=dict)
    #: kind -> one line per storm: CPU microseconds per accepted login of each broker process.
    cpu_us: dict[str, list[str]] = field(default_factory=dict)
    #: kind -> CPU microseconds per accepted login of all broker-side processes together.
    cpu_total_us: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: kind -> the 99th percentile of the devices' CONNECT-to-CONNACK time, one per storm (ms).
    login_p99_ms: dict[str, list[float]] = field(default_factory=dict)

    def record(self, ctx: Context, kind: str, round_: int, result: StormSummary, extra: str = "") -> None:
        """Keep one storm's rate, log it, and remember refusals or errors."""
        self.rates.setdefault(kind, []).append(result.rate)
        if result.p99_ms is not None:
            self.login_p99_ms.setdefault(kind, []).append(result.p99_ms)
        ctx.log(
            f"round {round_} {kind} {self.label:9}: {result.accepted} logins in {result.seconds:.2f} s = "
            f"{result.rate:,.0f}/s{extra} {result.failures}"
        )
        if result.failures:
            self.problems.append(f"round {round_} {kind} {self.label}: {result.failures}")

    def record_cpu(self, kind: str, per_process: dict[str, float]) -> None:
        """Keep one storm's CPU microseconds per login, by broker-side process."""
        self.cpu_total_us.setdefault(kind, []).append(sum(per_process.values()))
        self.cpu_us.setdefault(kind, []).append(", ".join(f"{n} {v:.0f}" for n, v in per_process.items()))

    def cpu_notes(self) -> list[str]:
        """One note per kind: the broker processes' CPU per login in each storm."""
        return [f"CPU µs per login, {self.label}, {kind}: {' | '.join(v)}" for kind, v in self.cpu_us.items()]


def storm_rows(what: str, ours: Side, reference: Side, reference_label: str) -> list[Row]:
    """A cold and a warm row: our median rate against the reference's, goal at least 0.8 times."""
    return [
        Row(
            f"{kind} login storm, {what}",
            "logins/s",
            median(ours.rates.get(kind, [])),
            median(reference.rates.get(kind, [])),
            reference_label,
            STORM_GOAL,
            ours.rates.get(kind, []),
            reference.rates.get(kind, []),
        )
        for kind in KINDS
    ]


def cpu_row(what: str, ours: Side, reference: Side, reference_label: str, kind: str = "warm") -> Row:
    """Broker-side CPU per login in the ``kind`` storms (no goal: it explains the rates)."""
    return Row(
        f"broker CPU per {kind} login, {what}",
        "µs",
        median(ours.cpu_total_us.get(kind, [])),
        median(reference.cpu_total_us.get(kind, [])),
        reference_label,
        None,
        ours.cpu_total_us.get(kind, []),
        reference.cpu_total_us.get(kind, []),
        note="user + system CPU of the broker-side processes over the storm / logins accepted",
    )


def login_latency_rows(ours: Side, reference: Side, reference_label: str) -> list[Row]:
    """The devices' login p99 (CONNECT to CONNACK) per storm kind, against the reference's."""
    return [
        Row(
            f"device login p99 during the {kind} storm",
            "ms",
            median(ours.login_p99_ms.get(kind, [])),
            median(reference.login_p99_ms.get(kind, [])),
            reference_label,
            None,
            ours.login_p99_ms.get(kind, []),
            reference.login_p99_ms.get(kind, []),
        )
        for kind in KINDS
    ]


def load_average() -> float:
    """The machine's 1-minute load average (other work shares the cores with the storms)."""
    return float(Path("/proc/loadavg").read_text(encoding="ascii").split()[0])


def load_note(before: float) -> str:
    """The load average over the figure: above the CPU count, the rates are noisy."""
    return (
        f"1-minute load average {before:.1f} at the start, {load_average():.1f} at the end, "
        f"on {os.cpu_count()} CPUs: above the CPU count, other work competes with the storms and "
        "the rates vary from run to run; the CPU per login does not"
    )
