"""``mqttprov devices export`` and ``devices import``: the fleet to and from files."""

from __future__ import annotations

import csv
import enum
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    ConfigOption,
    JsonOption,
    fail,
    open_registry,
    print_json,
    run,
    settings_from,
    stdout,
)
from broker.cli.device_filters import (
    CreatedFrom,
    CreatedUntil,
    FilterLabelOption,
    SearchOption,
    SeenFrom,
    SeenUntil,
    StatusOption,
    device_filter,
)
from provisioning.registry.transfer import (
    EXPORT_COLUMNS,
    ImportFileError,
    ImportReport,
    ImportRow,
    export_row,
    import_rows,
    read_csv,
    report_json,
)


class ExportFormat(enum.StrEnum):
    """What ``devices export`` writes."""

    CSV = "csv"
    JSONL = "jsonl"


def export(  # typer passes options by keyword
    *,
    status: StatusOption = None,
    label: FilterLabelOption = None,
    search: SearchOption = None,
    created_from: CreatedFrom = None,
    created_until: CreatedUntil = None,
    seen_from: SeenFrom = None,
    seen_until: SeenUntil = None,
    output_format: Annotated[ExportFormat, typer.Option("--format", "-f", help="csv or jsonl.")] = (
        ExportFormat.CSV
    ),
    output: Annotated[
        Path | None, typer.Option("--output", "-o", dir_okay=False, help="Write here instead of stdout.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Write every matching device, streamed: CSV (the import's columns and more) or JSON lines."""
    wanted = device_filter(status, label, search, (created_from, created_until), (seen_from, seen_until))
    settings = settings_from(config)

    try:
        sink = output.open("w", newline="", encoding="utf-8") if output else nullcontext(sys.stdout)
    except OSError as exc:
        fail(f"error: {output}: {exc.strerror or exc}", EXIT_USAGE)

    with sink as fh:
        writer = csv.writer(fh)

        async def work() -> int:
            written = 0
            if output_format is ExportFormat.CSV:
                writer.writerow(EXPORT_COLUMNS)
            async with open_registry(settings) as registry:
                async for device in registry.export_devices(wanted):
                    if output_format is ExportFormat.CSV:
                        writer.writerow(export_row(device))
                    else:
                        fh.write(device.model_dump_json() + "\n")
                    written += 1
            return written

        written = run(work)
    if output is not None:
        stdout.print(f"exported {written} devices to {output}", markup=False)


def _read_rows(path: Path) -> list[ImportRow]:
    """The CSV's records with their line numbers; exit 2 when the file itself is unusable."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
            return read_csv(fh)
    except ImportFileError as exc:
        fail(f"error: {path}: {exc}", EXIT_USAGE)
    except FileNotFoundError:
        fail(f"error: {path}: no such file", EXIT_USAGE)
    except UnicodeDecodeError:
        fail(f"error: {path}: not UTF-8 text", EXIT_USAGE)
    except OSError as exc:
        fail(f"error: {path}: {exc.strerror or exc}", EXIT_USAGE)


def import_devices(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE.csv",
            help="CSV with a header: mac, optional firmware, note and labels (KEY=VALUE;KEY=VALUE).",
        ),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Allow every MAC of a CSV file to enrol; bad lines are reported and skipped."""
    settings = settings_from(config)
    rows = _read_rows(file)
    progress = Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stdout,
        transient=True,
        disable=as_json or not sys.stdout.isatty(),
    )

    async def work() -> ImportReport:
        task = progress.add_task("import", total=len(rows))
        async with open_registry(settings) as registry:
            return await import_rows(registry, rows, done=lambda: progress.advance(task))

    with progress:
        report = run(work)
    if as_json:
        print_json(report_json(report))
    else:
        for error in report.errors:
            typer.echo(f"line {error.line}: {error.mac or '(empty)'}: {error.error}", err=True)
        stdout.print(f"imported {report.imported}, skipped {len(report.errors)}")
    if report.errors:
        raise typer.Exit(EXIT_FAILED)
