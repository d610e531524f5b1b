"""Results: rows of ours-vs-reference figures, their goals, the table and the JSON file."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

GoalKind = Literal["ratio_at_least", "ratio_at_most", "at_most"]
JSON_VERSION = 1
#: Ratios end in a multiplication sign, written as an escape (linters take it for an x).
TIMES = "\N{MULTIPLICATION SIGN}"


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, not {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float | None:
    """The median of the rounds, or None when there were none."""
    return statistics.median(values) if values else None


def ratio(ours: float | None, reference: float | None) -> float | None:
    """``ours / reference``, or None when either is missing or the reference is zero."""
    if ours is None or reference is None or reference == 0:
        return None
    return ours / reference


@dataclass(frozen=True)
class Goal:
    """What a row must reach: a ratio to its reference, or an absolute ceiling."""

    kind: GoalKind
    value: float
    unit: str = ""

    def text(self) -> str:
        """The goal as the table shows it."""
        if self.kind == "ratio_at_least":
            return f"≥ {self.value:g}{TIMES}"
        if self.kind == "ratio_at_most":
            return f"≤ {self.value:g}{TIMES}"
        return f"≤ {self.value:g} {self.unit}".rstrip()

    def met(self, ours: float | None, ratio_: float | None) -> bool | None:
        """True or False when measurable, None when the figure is missing."""
        if self.kind == "at_most":
            return None if ours is None else ours <= self.value
        if ratio_ is None:
            return None
        return ratio_ >= self.value if self.kind == "ratio_at_least" else ratio_ <= self.value


@dataclass
class Row:
    """One line of the table: our figure, its reference in the same run, the goal."""

    label: str
    unit: str
    ours: float | None
    reference: float | None = None
    reference_label: str = ""
    goal: Goal | None = None
    ours_samples: list[float] = field(default_factory=list)
    reference_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Ours divided by the reference."""
        return ratio(self.ours, self.reference)

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (None: no goal, or nothing measured)."""
        return None if self.goal is None else self.goal.met(self.ours, self.ratio)

    def as_json(self) -> dict[str, Any]:
        """The row as plain JSON data."""
        return {
            "label": self.label,
            "unit": self.unit,
            "ours": self.ours,
            "reference": self.reference,
            "reference_label": self.reference_label,
            "ratio": self.ratio,
            "goal": None
            if self.goal is None
            else {
                "kind": self.goal.kind,
                "value": self.goal.value,
                "unit": self.goal.unit,
                "text": self.goal.text(),
            },
            "met": self.met,
            "samples": {"ours": self.ours_samples, "reference": self.reference_samples},
            "note": self.note,
        }


@dataclass
class FigureResult:
    """Everything one figure measured, or why it crashed."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    processes: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    #: Time series for the optional plot: name -> [(seconds since the storm began, latency ms)].
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The figure as plain JSON data (without the plot series)."""
        return {
            "name": self.name,
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "processes": self.processes,
            "sizes": self.sizes,
            "notes": self.notes,
            "error": self.error,
            "rows": [row.as_json() for row in self.rows],
        }


@dataclass
class Report:
    """A whole run."""

    started: str
    quick: bool
    machine: dict[str, Any]
    figures: list[FigureResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def crashed(self) -> bool:
        """True when any figure crashed (the only reason to exit non-zero)."""
        return any(figure.error is not None for figure in self.figures)

    def as_json(self) -> dict[str, Any]:
        """The machine-readable result file."""
        return {
            "version": JSON_VERSION,
            "started": self.started,
            "quick": self.quick,
            "seconds": round(self.seconds, 1),
            "machine": self.machine,
            "crashed": self.crashed,
            "figures": [figure.as_json() for figure in self.figures],
        }


def number(value: float | None, unit: str = "") -> str:
    """A value for the table: thousands separated, three significant digits below 100."""
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[value]


HEADERS = ("figure", "ours", "reference", "ratio", "goal", "met?")


def table_rows(figures: Sequence[FigureResult]) -> list[tuple[str, ...]]:
    """The table's cells, one tuple per row (a crashed figure gets one row saying so)."""
    cells: list[tuple[str, ...]] = []
    for figure in figures:
        if figure.error is not None:
            cells.append((figure.title, "crashed", "—", "—", "—", "—"))
            continue
        for row in figure.rows:
            reference = number(row.reference, row.unit)
            if row.reference_label:
                reference = (
                    f"{reference} ({row.reference_label})"
                    if row.reference is not None
                    else (f"— ({row.reference_label})")
                )
            cells.append(
                (
                    row.label,
                    number(row.ours, row.unit),
                    reference,
                    "—" if row.ratio is None else f"{row.ratio:.2f}{TIMES}",
                    "—" if row.goal is None else row.goal.text(),
                    _met(row.met),
                )
            )
    return cells


def render_table(figures: Sequence[FigureResult]) -> str:
    """A Markdown table with aligned columns (readable in a terminal, pasteable in docs)."""
    rows = [HEADERS, *table_rows(figures)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), separator, *(line(row) for row in rows[1:])])
