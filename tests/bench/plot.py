"""Optional plot of delivery latency over time during the cold storm (only if matplotlib is there).

matplotlib is not a dependency of mqttprov: without it the bench says so and writes nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from tests.bench.results import FigureResult


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(figures: Sequence[FigureResult], directory: Path) -> str:
    """Write one PNG per figure that recorded a time series; returns a line saying what happened."""
    with_series = [figure for figure in figures if figure.series and figure.error is None]
    if not with_series:
        return "no plot: none of the figures that ran records latency over time (cold-storm does)"
    if not matplotlib_available():
        return (
            "no plot: matplotlib is not installed (it is not a dependency; pip install matplotlib to get one)"
        )
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for figure in with_series:
        fig, axes = pyplot.subplots(figsize=(10, 5))
        for name, points in figure.series.items():
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker=".", linestyle="none", markersize=3, label=name)
        axes.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        axes.set_yscale("log")
        axes.set_xlabel("seconds since the storm began (dashed line)")
        axes.set_ylabel("delivery latency, ms (log scale)")
        axes.set_title(f"{figure.title}: one probe message every 20 ms")
        axes.legend(fontsize="small")
        path = directory / f"{figure.name}-latency.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        pyplot.close(fig)
        written.append(path)
    return "plots written: " + ", ".join(str(path) for path in written)
