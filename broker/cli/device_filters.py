"""The device filter options ``devices list`` and ``devices export`` share, and label arguments."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from pydantic import ValidationError

from broker.cli.common import EXIT_USAGE, fail
from provisioning.registry import DeviceFilter, DeviceStatus, InvalidLabelError, parse_labels


def labels_from(texts: list[str] | None) -> dict[str, str]:
    """The ``KEY=VALUE`` labels of the command line, or exit 2 with what is wrong."""
    try:
        return parse_labels(texts or [])
    except InvalidLabelError as exc:
        fail(f"error: {exc}", EXIT_USAGE)


StatusOption = Annotated[
    list[DeviceStatus] | None,
    typer.Option("--status", "-s", help="Only devices in this status (repeat: any of them)."),
]
SearchOption = Annotated[
    str | None,
    typer.Option(
        "--search", "-q", metavar="TEXT", help="Prefix of a MAC (any notation), a device id or a username."
    ),
]
FilterLabelOption = Annotated[
    list[str] | None,
    typer.Option(
        "--label", "-l", metavar="KEY=VALUE", help="Only devices with this label (repeat: all of them)."
    ),
]
_TIME_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
CreatedFrom = Annotated[
    datetime | None, typer.Option(formats=_TIME_FORMATS, help="Created at or after this time (UTC).")
]
CreatedUntil = Annotated[
    datetime | None, typer.Option(formats=_TIME_FORMATS, help="Created before this time (UTC).")
]
SeenFrom = Annotated[
    datetime | None, typer.Option(formats=_TIME_FORMATS, help="Last seen at or after this time (UTC).")
]
SeenUntil = Annotated[
    datetime | None, typer.Option(formats=_TIME_FORMATS, help="Last seen before this time (UTC).")
]


def device_filter(
    status: list[DeviceStatus] | None,
    labels: list[str] | None,
    search: str | None,
    created: tuple[datetime | None, datetime | None],
    seen: tuple[datetime | None, datetime | None],
) -> DeviceFilter:
    """The filter the options describe, or exit 2 with what is wrong."""
    fields = {
        "status": status or [],
        "labels": labels_from(labels),
        "search": search,
        "created_from": created[0],
        "created_until": created[1],
        "seen_from": seen[0],
        "seen_until": seen[1],
    }
    try:
        return DeviceFilter.model_validate(fields)
    except ValidationError as exc:
        problem = exc.errors()[0]
        fail(f"error: --{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}", EXIT_USAGE)
