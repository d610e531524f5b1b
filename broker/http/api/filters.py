"""The device filter of ``GET /devices`` and ``GET /devices/export``, read from the query string.

The same :class:`DeviceFilter` as ``mqttprov devices list``: every parameter given must match
(AND); ``status`` repeated means any of them, ``label`` repeated means all of them.
"""

from __future__ import annotations

from datetime import datetime
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, Query
from pydantic import ValidationError

from broker.http.api.problems import ApiError
from provisioning.registry import MAX_LABELS, DeviceFilter, DeviceStatus, parse_labels


def device_filter(  # FastAPI reads each keyword from the query
    *,
    status: Annotated[
        list[DeviceStatus] | None,
        Query(description="Only devices in this status; repeat for any of several."),
    ] = None,
    label: Annotated[
        list[Annotated[str, Query(max_length=127)]] | None,
        Query(
            max_length=MAX_LABELS,
            description="`key=value`: only devices carrying this label; repeat for all of several.",
            examples=["site=berlin"],
        ),
    ] = None,
    q: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            description="A prefix of a MAC (any notation), of a device id or of a username.",
            examples=["02:00:00"],
        ),
    ] = None,
    created_from: Annotated[datetime | None, Query(description="Created at or after (UTC if naive).")] = None,
    created_until: Annotated[datetime | None, Query(description="Created before (UTC if naive).")] = None,
    seen_from: Annotated[datetime | None, Query(description="Last seen at or after (UTC if naive).")] = None,
    seen_until: Annotated[datetime | None, Query(description="Last seen before (UTC if naive).")] = None,
) -> DeviceFilter:
    """The filter the query asks for; 422 ``INVALID_LABEL`` or ``INVALID_REQUEST`` for a bad one."""
    labels = parse_labels(label or [])  # InvalidLabelError: a 422 problem with its own code
    try:
        return DeviceFilter(
            status=frozenset(status or ()),
            labels=labels,
            search=q,
            created_from=created_from,
            created_until=created_until,
            seen_from=seen_from,
            seen_until=seen_until,
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = {"search": "q"}.get(str(problem["loc"][0]), str(problem["loc"][0]))
        raise ApiError(
            HTTPStatus.UNPROCESSABLE_ENTITY, "INVALID_REQUEST", f"query.{where}: {problem['msg']}"
        ) from exc


#: A route's parameter that receives the query's device filter.
Filter = Annotated[DeviceFilter, Depends(device_filter)]
