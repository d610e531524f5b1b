"""``/devices``: find devices (status, label, a MAC in any notation, an id or a username), see one
with its events, and reset, decommission or delete it.

Every change is the registry method the CLI and the API call (``broker.http.api.devices``): the
same audit event and change-feed row, so a decommissioned device is thrown off within 2 s.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from broker.http.api.devices import MAX_OFFSET, find
from broker.http.console.render import done, page, when
from broker.http.console.security import ConsoleDep, Post, Session
from provisioning.errors import InvalidMacError, ProvisioningError
from provisioning.mac import parse_mac
from provisioning.registry import DeviceFilter, DeviceInfo, DeviceStatus, parse_label

router = APIRouter(prefix="/devices", include_in_schema=False)

PAGE = 50
EVENTS = 50
NOTICES = {
    "reset": "Credentials revoked: the device may enrol once more.",
    "decommissioned": "Decommissioned: its sessions are ended and its credentials stop working.",
    "approved": "Approved: the device gets its credentials on its next request.",
    "rejected": "Rejected: the device's requests are refused.",
    "deleted": "Deleted. Its audit events stay in the registry.",
}


@router.get("")
async def device_list(
    request: Request,
    console: ConsoleDep,
    session: Session,
    *,
    # Text, not the enum: the form sends an empty status for "any".
    status_name: Annotated[str, Query(alias="status", max_length=16)] = "",
    label: Annotated[str, Query(max_length=130)] = "",
    q: Annotated[str, Query(max_length=64)] = "",
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    fragment: Annotated[str, Query(max_length=1)] = "",
) -> Response:
    """One page of devices, oldest first; ``?fragment=1``: only its rows (polled for presence)."""
    query = {k: v for k, v in (("status", status_name), ("label", label), ("q", q)) if v}
    error = None
    try:
        status = DeviceStatus(status_name) if status_name else None
        wanted = DeviceFilter(
            status=frozenset({status}) if status else frozenset(),
            labels=dict([parse_label(label)]) if label.strip() else {},
            search=q.strip() or None,
        )
        found = await console.services.registry.search_devices(wanted, limit=PAGE, offset=offset)
        devices, total = found.devices, found.total
    except (ProvisioningError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        error, devices, total = _one_line(exc), [], 0
    context: dict[str, Any] = {
        "devices": devices,
        "total": total,
        "offset": offset,
        "page_size": PAGE,
        "chosen_status": status_name,
        "label": label,
        "q": q,
        "when": when,
        "rows_url": "/devices?" + urlencode({**query, "offset": offset, "fragment": 1}),
        "previous_url": "/devices?" + urlencode({**query, "offset": max(0, offset - PAGE)}),
        "next_url": "/devices?" + urlencode({**query, "offset": offset + PAGE}),
    }
    template = "_device_rows.html" if fragment else "devices.html"
    return page(request, template, session, error=error, status=400 if error else 200, **context)


@router.get("/{device_id}")
async def device_detail(
    request: Request,
    console: ConsoleDep,
    session: Session,
    device_id: uuid.UUID,
    notice: Annotated[str, Query(alias="done", max_length=32)] = "",
) -> Response:
    """A device's fields, labels and most recent events, and what may be done to it."""
    return await _detail(request, console, session, str(device_id), notice=NOTICES.get(notice))


async def _detail(
    request: Request,
    console: ConsoleDep,
    session: Session,
    device_id: str,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    registry = console.services.registry
    try:
        device = await find(registry, device_id)
    except ProvisioningError as exc:
        return page(request, "device.html", session, error=_one_line(exc), status=404, device=None)
    events = await registry.events(device.id, limit=EVENTS)
    return page(
        request,
        "device.html",
        session,
        notice=notice,
        error=error,
        status=status,
        device=device,
        events=events,
        when=when,
        statuses=DeviceStatus,
    )


@router.post("/{device_id}/{action}")
async def change_device(
    request: Request, console: ConsoleDep, posted: Post, device_id: uuid.UUID, action: str
) -> Response:
    """Approve, reject, reset, decommission (typed confirmation: the MAC) or delete the device."""
    registry = console.services.registry
    session = posted.session
    changes = {
        "approve": registry.approve,
        "reject": registry.reject,
        "reset": registry.reset,
        "decommission": registry.decommission,
        "delete": registry.delete,
    }
    if action not in changes:
        return await _detail(request, console, session, str(device_id), error="No such action.", status=404)
    try:
        device = await registry.get(device_id)
        if action == "decommission" and not _confirms(posted.get("confirm"), device):
            return await _detail(
                request,
                console,
                session,
                str(device_id),
                error=f"Not decommissioned: type the device's MAC ({device.mac}) to confirm.",
                status=400,
            )
        await changes[action](device.id)
    except ProvisioningError as exc:
        return await _detail(request, console, session, str(device_id), error=_one_line(exc), status=409)
    if action == "delete":
        return done("/devices", "deleted")
    return done(f"/devices/{device_id}", _past(action))


def _past(action: str) -> str:
    return {"approve": "approved", "reject": "rejected", "reset": "reset"}.get(action, "decommissioned")


def _confirms(typed: str, device: DeviceInfo) -> bool:
    """True when ``typed`` is the device's MAC in any notation."""
    try:
        return parse_mac(typed) == device.mac
    except InvalidMacError:
        return False


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "filter"
        return f"{where}: {problem['msg']}"
    return str(exc).splitlines()[0]
