"""``GET /api/v1/devices/export`` and ``POST /api/v1/devices/import``: many devices at once.

The formats are the CLI's (:mod:`provisioning.registry.transfer`): a file exported here or by
``mqttprov devices export`` reads the same, and one imported here is read as ``mqttprov devices
import`` reads it. An export is streamed: the registry is read a chunk at a time, each chunk in
a short transaction, and a chunk is read only once the client has taken the one before, so a
slow client holds no connection and the process never holds the whole fleet.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from broker.http.api.context import Services
from broker.http.api.filters import Filter
from broker.http.api.problems import ApiError, problems
from broker.http.api.security import Reader, Writer
from provisioning.registry import DeviceInfo
from provisioning.registry.transfer import (
    EXPORT_COLUMNS,
    FIRMWARE_MAX,
    NOTE_MAX,
    ImportFileError,
    export_row,
    import_rows,
    read_csv,
    read_json,
    report_json,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/devices", tags=["devices"])

#: Records one import may hold (the body is bounded by ``[api] max_body_bytes`` too): each is
#: one transaction, and the answer waits for the last.
MAX_IMPORT_RECORDS = 10_000
CSV = "text/csv"
JSONL = "application/x-ndjson"


class ExportFormat(enum.StrEnum):
    """What an export writes: the CLI's CSV, or one JSON device per line."""

    CSV = "csv"
    JSONL = "jsonl"


def _text_content(description: str, **media: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            media_type: {"schema": {"type": "string"}, "example": ex} for media_type, ex in media.items()
        },
    }


@router.get(
    "/export",
    summary="Export devices",
    response_class=StreamingResponse,
    responses={
        HTTPStatus.OK.value: _text_content(
            "Every matching device, oldest first, streamed.",
            **{
                CSV: ",".join(EXPORT_COLUMNS) + "\n",
                JSONL: '{"id": "...", "mac": "02:00:00:00:00:01", ...}\n',
            },
        )
    },
)
async def export_devices(
    services: Services,
    _token: Reader,
    wanted: Filter,
    output_format: Annotated[
        ExportFormat, Query(alias="format", description="`csv` (the import's columns and more) or `jsonl`.")
    ] = ExportFormat.CSV,
) -> StreamingResponse:
    """Every device matching the filters (the list's), streamed as CSV or JSON lines.

    Not one snapshot: a device added while the export runs appears if it sorts after the part
    already sent; one deleted meanwhile may be missing.
    """
    devices = aiter(services.registry.export_devices(wanted))
    # The first chunk is read before the answer starts: a registry that is away is a 503
    # problem, not a 200 cut short.
    first = await anext(devices, None)
    if output_format is ExportFormat.CSV:
        body, media_type, name = _csv_lines(first, devices), f"{CSV}; charset=utf-8", "devices.csv"
    else:
        body, media_type, name = _json_lines(first, devices), JSONL, "devices.jsonl"
    headers = {"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"}
    return StreamingResponse(body, media_type=media_type, headers=headers)


async def _csv_lines(first: DeviceInfo | None, rest: AsyncIterator[DeviceInfo]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    if first is not None:
        writer.writerow(export_row(first))
        async for device in rest:
            writer.writerow(export_row(device))
            if buffer.tell() >= 64 * 1024:  # a few hundred rows per write, not one each
                yield _take(buffer)
    yield _take(buffer)


async def _json_lines(first: DeviceInfo | None, rest: AsyncIterator[DeviceInfo]) -> AsyncIterator[str]:
    if first is None:
        return
    buffer = io.StringIO()
    buffer.write(first.model_dump_json() + "\n")
    async for device in rest:
        buffer.write(device.model_dump_json() + "\n")
        if buffer.tell() >= 64 * 1024:
            yield _take(buffer)
    yield _take(buffer)


def _take(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


class ImportRecord(BaseModel):
    """One device to allow (status ``approved``), as a CSV line of ``mqttprov devices import``."""

    mac: str = Field(examples=["02:00:00:00:00:01"])
    firmware: str | None = Field(default=None, max_length=FIRMWARE_MAX)
    note: str | None = Field(default=None, max_length=NOTE_MAX)
    labels: dict[str, str] | str | None = Field(
        default=None, description="An object, or `key=value;key2=value2` as in the CSV."
    )


class SkippedRecord(BaseModel):
    """A record that was skipped, and why (the others were imported)."""

    line: int = Field(
        description="The CSV line (the header is line 1), or the JSON record's position from 1."
    )
    mac: str
    error: str


class ImportReport(BaseModel):
    """What an import did."""

    imported: int
    errors: list[SkippedRecord]


_IMPORT_BODY = {
    "required": True,
    "content": {
        CSV: {
            "schema": {"type": "string"},
            "example": "mac,firmware,note,labels\n02:00:00:00:00:01,1.2.0,rack 4,site=berlin;line=2\n",
        },
        "application/json": {
            "schema": {
                "type": "array",
                "maxItems": MAX_IMPORT_RECORDS,
                "items": ImportRecord.model_json_schema(),
            }
        },
    },
}


@router.post(
    "/import",
    summary="Import devices",
    response_model=ImportReport,
    responses=problems(
        UNPROCESSABLE_ENTITY="Not an import: no `mac` column, not UTF-8, too many records.",
        UNSUPPORTED_MEDIA_TYPE="Neither text/csv nor application/json.",
    ),
    openapi_extra={"requestBody": _IMPORT_BODY},
)
async def import_devices(request: Request, services: Services, _token: Writer) -> JSONResponse:
    """Allow every MAC of a CSV (the CLI's import format) or JSON list to enrol.

    Each record is its own transaction: a bad one (an invalid MAC, one already registered, a
    label outside the charset) is reported with its line and skipped, and the others are
    imported. At most 10,000 records, within ``[api] max_body_bytes``.
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    payload = await request.body()
    try:
        text = payload.decode("utf-8-sig")  # -sig: spreadsheets write a BOM
    except UnicodeDecodeError as exc:
        raise ImportFileError("the body is not UTF-8 text") from exc
    if media_type in {CSV, "application/csv"}:
        rows = read_csv(io.StringIO(text, newline=""), max_rows=MAX_IMPORT_RECORDS)
    elif media_type == "application/json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ImportFileError(f"the body is not JSON: {exc}") from exc
        rows = read_json(data, max_rows=MAX_IMPORT_RECORDS)
    else:
        raise ApiError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send the import as text/csv or application/json",
        )
    report = await import_rows(services.registry, rows)
    logger.info("api: devices imported: %d added, %d skipped", report.imported, len(report.errors))
    return JSONResponse(report_json(report))
