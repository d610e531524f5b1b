"""``python -m tests.bench``: parse, run the selected figures, print the table, write the files.

Exits 0 whether or not goals are met; 1 only when a figure crashed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from tests.bench.context import FULL, QUICK, Context
from tests.bench.results import FigureResult, Report, render_table

#: Figure names in the order they run (kept here so parsing needs no heavy import).
FIGURE_NAMES = (
    "warm-storm",
    "cold-storm",
    "provisioning",
    "http-provisioning",
    "throughput",
    "registry",
    "api-pages",
    "memory",
    "login-timing",
    "restart-storm",
    "flood",
    "enrol-burst",
    "uvloop",
    "many-subscribers",
    "subscribe-storm",
    "mosquitto-storm",
    "rabbitmq-storm",
)
EXIT_CRASH = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    quick: bool
    json_file: Path | None
    only: tuple[str, ...]
    plot_dir: Path | None


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line; ``--only`` may repeat or take a comma-separated list."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="mqttprov benchmarks: every figure side by side with its reference, in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI; about 2 minutes)")
    parser.add_argument("--json", dest="json_file", type=Path, metavar="FILE", help="write results as JSON")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these figures (repeat or comma-separate): {', '.join(FIGURE_NAMES)}",
    )
    parser.add_argument(
        "--plot",
        dest="plot_dir",
        type=Path,
        metavar="DIR",
        help="write latency plots here (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    return Options(args.quick, args.json_file, select_figures(args.only, parser), args.plot_dir)


def select_figures(
    requested: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> tuple[str, ...]:
    """The figures to run, in run order; all of them when nothing was requested."""
    names = {name.strip() for item in requested for name in item.split(",") if name.strip()}
    unknown = sorted(names - set(FIGURE_NAMES))
    if unknown:
        message = f"unknown figure {', '.join(unknown)} (choose from {', '.join(FIGURE_NAMES)})"
        if parser is not None:
            parser.error(message)
        raise ValueError(message)
    return tuple(name for name in FIGURE_NAMES if not names or name in names)


def machine() -> dict[str, Any]:
    """Where the run happened: CPU count and model, Python, amqtt, Mosquitto."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version  # noqa: PLC0415

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "amqtt": version("amqtt"),
        "bcrypt": version("bcrypt"),
        "mosquitto": _mosquitto_version(),
    }


def _mosquitto_version() -> str | None:
    binary = Path("/usr/sbin/mosquitto")
    if not binary.is_file():
        return None
    try:
        out = subprocess.run(
            [str(binary), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("mosquitto version ").strip() or None


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM ends the run like Ctrl-C: every finally block stops its processes.
    raise KeyboardInterrupt(f"signal {signum}")


def run(options: Options) -> Report:
    """Run the selected figures; a crash in one is recorded and the others still run."""
    from tests.bench.figures import all_figures  # noqa: PLC0415 - heavy imports only when running

    figures = {figure.name: figure for figure in all_figures()}
    sizes = QUICK if options.quick else FULL
    report = Report(datetime.now(UTC).isoformat(timespec="seconds"), options.quick, machine())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mqttprov-bench-") as workdir:
        for name in options.only:
            figure = figures[name]
            print(f"\n== {figure.name}: {figure.title}", flush=True)
            context = Context(sizes, options.quick, Path(workdir), _logger(name))
            began = time.monotonic()
            try:
                result = figure.run(context)
            except Exception:
                result = FigureResult(figure.name, figure.title, error=traceback.format_exc())
                print(f"  CRASHED:\n{result.error}", file=sys.stderr, flush=True)
            result.seconds = time.monotonic() - began
            report.figures.append(result)
            _print_figure(result)
    report.seconds = time.monotonic() - started
    return report


def _logger(name: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"  [{name}] {line}", flush=True)

    return log


def _print_figure(result: FigureResult) -> None:
    for side, description in result.processes.items():
        print(f"  processes, {side}: {description}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"  ({result.seconds:.1f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The command: returns the exit status."""
    options = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(options)
    except KeyboardInterrupt:
        print("\ninterrupted: every broker and load process was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\n{render_table(report.figures)}")
    where = report.machine
    print(
        f"\n{len(report.figures)} figure(s) in {report.seconds:.0f} s on {where.get('nproc')} CPUs "
        f"({where.get('cpu_model', 'unknown CPU')})"
    )
    if options.json_file is not None:
        options.json_file.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
        print(f"results written to {options.json_file}")
    if options.plot_dir is not None:
        from tests.bench.plot import write_plots  # noqa: PLC0415

        print(write_plots(report.figures, options.plot_dir))
    return EXIT_CRASH if report.crashed else 0
