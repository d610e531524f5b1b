"""The device file formats of ``devices import`` and ``devices export``, for the CLI and the API.

Import: CSV with a header line (``mac``, optional ``firmware``, ``note`` and ``labels`` as
``k=v;k2=v2``), or JSON (a list of objects with the same keys; ``labels`` may also be an
object). Each record is added with :meth:`DeviceRegistry.add_allowed`; a bad record is reported
with its line (CSV) or position (JSON, from 1) and skipped, never stopping the others.

Export: the CSV columns of :data:`EXPORT_COLUMNS` (the import's and more), or JSON lines.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from provisioning.errors import DeviceExistsError, InvalidMacError, ProvisioningError
from provisioning.mac import parse_mac
from provisioning.registry.labels import InvalidLabelError, parse_labels
from provisioning.registry.repository import DeviceRegistry
from provisioning.registry.schemas import DeviceInfo

# The registry's column widths: checked here so an over-long value is a clear refusal on every
# database (SQLite would store it, PostgreSQL would fail the insert).
FIRMWARE_MAX = 64
NOTE_MAX = 256

EXPORT_COLUMNS = [
    "id",
    "mac",
    "mqtt_username",
    "status",
    "firmware",
    "note",
    "created_at",
    "last_seen_at",
    "labels",
]


class ImportFileError(ProvisioningError, ValueError):
    """The import as a whole is unusable (no ``mac`` column, not CSV, too many records)."""

    error_code = "INVALID_IMPORT"


@dataclass(frozen=True)
class ImportRow:
    """One record to import: where it was (CSV line, or JSON position) and its fields as given."""

    line: int
    mac: str
    firmware: str | None = None
    note: str | None = None
    #: ``k=v;k2=v2`` as written in the file.
    labels: str | None = None


@dataclass(frozen=True)
class ImportProblem:
    """A record that was skipped, and why."""

    line: int
    mac: str
    error: str


@dataclass
class ImportReport:
    """What an import did: how many were added, and each record skipped."""

    imported: int = 0
    errors: list[ImportProblem] = field(default_factory=list)


def export_row(device: DeviceInfo) -> list[str]:
    """One device as the cells of :data:`EXPORT_COLUMNS`."""
    return [
        str(device.id),
        device.mac,
        device.mqtt_username,
        device.status.value,
        device.firmware_version or "",
        device.note or "",
        device.created_at.isoformat(),
        device.last_seen_at.isoformat() if device.last_seen_at else "",
        ";".join(f"{k}={v}" for k, v in sorted(device.labels.items())),
    ]


def read_csv(lines: Iterable[str], *, max_rows: int | None = None) -> list[ImportRow]:
    """The records of an import CSV with their line numbers; :class:`ImportFileError` when the
    file itself is unusable (no ``mac`` column, broken quoting, more than ``max_rows``)."""
    reader = csv.DictReader(lines)
    line = 1
    try:
        columns = [name.strip().lower() for name in reader.fieldnames or []]
        if "mac" not in columns:
            raise ImportFileError("no 'mac' column in the header line")
        reader.fieldnames = columns
        rows: list[ImportRow] = []
        for record in reader:
            line = reader.line_num
            if max_rows is not None and len(rows) >= max_rows:
                raise ImportFileError(f"more than {max_rows} records: split the file")
            rows.append(
                ImportRow(
                    line,
                    (record.get("mac") or "").strip(),
                    _text(record.get("firmware")),
                    _text(record.get("note")),
                    _text(record.get("labels")),
                )
            )
    except csv.Error as exc:
        raise ImportFileError(f"line {line + 1}: {exc}") from exc
    return rows


def read_json(data: object, *, max_rows: int | None = None) -> list[ImportRow]:
    """The records of a JSON import (a list of objects), numbered from 1."""
    if not isinstance(data, list):
        raise ImportFileError("a JSON import is a list of objects with a 'mac' key")
    if max_rows is not None and len(data) > max_rows:
        raise ImportFileError(f"more than {max_rows} records: split the import")
    return [_json_row(position, record) for position, record in enumerate(data, start=1)]


def _json_row(position: int, record: object) -> ImportRow:
    if not isinstance(record, dict):
        return ImportRow(position, "")  # reported as an invalid MAC, like an empty CSV cell
    labels: object = record.get("labels")
    if isinstance(labels, Mapping):
        labels = ";".join(f"{k}={v}" for k, v in labels.items())
    return ImportRow(
        position,
        _string(record.get("mac")) or "",
        _text(_string(record.get("firmware"))),
        _text(_string(record.get("note"))),
        _text(_string(labels)),
    )


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def too_long(firmware: str | None, note: str | None) -> str | None:
    """Why a firmware version or note cannot be stored, or None."""
    if firmware is not None and len(firmware) > FIRMWARE_MAX:
        return f"firmware is longer than {FIRMWARE_MAX} characters"
    if note is not None and len(note) > NOTE_MAX:
        return f"note is longer than {NOTE_MAX} characters"
    return None


async def import_row(registry: DeviceRegistry, row: ImportRow, seen: set[str]) -> str | None:
    """Add one record (status ``approved``); the reason it was skipped, or None when it was added.

    ``seen``: the MACs of the import so far, to report a MAC given twice.
    """
    try:
        mac = parse_mac(row.mac)
    except InvalidMacError:
        return "invalid MAC"
    if mac in seen:
        return "duplicate in file"
    seen.add(mac)
    problem = too_long(row.firmware, row.note)
    if problem is not None:
        return problem
    try:
        labels = parse_labels(part for part in (row.labels or "").split(";") if part.strip())
        await registry.add_allowed(mac, firmware_version=row.firmware, note=row.note, labels=labels)
    except InvalidLabelError as exc:
        return str(exc)
    except DeviceExistsError:
        return "already registered"
    return None


async def import_rows(
    registry: DeviceRegistry, rows: Iterable[ImportRow], *, done: Callable[[], object] | None = None
) -> ImportReport:
    """Import every record in order; one transaction each, so a bad record spoils no other.

    ``done``: called after each record (a progress bar).
    """
    report = ImportReport()
    seen: set[str] = set()
    for row in rows:
        reason = await import_row(registry, row, seen)
        if reason is None:
            report.imported += 1
        else:
            report.errors.append(ImportProblem(row.line, row.mac, reason))
        if done is not None:
            done()
    return report


def report_json(report: ImportReport) -> dict[str, Any]:
    """The report as the CLI's ``--json`` and the API print it."""
    return {
        "imported": report.imported,
        "errors": [{"line": e.line, "mac": e.mac, "error": e.error} for e in report.errors],
    }
