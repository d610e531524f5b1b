"""``/api/v1/devices``: list, inspect, allow, decide on, reset, decommission and delete devices.

Every change goes through the :class:`DeviceRegistry` methods the CLI calls: the same checks,
the same audit events, the same change-feed rows (a decommissioned device is thrown off by every
serving process within 2 s).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from broker.http.api.context import Services
from broker.http.api.filters import Filter
from broker.http.api.problems import problems
from broker.http.api.security import Reader, Writer
from provisioning.errors import DeviceNotFoundError, InvalidMacError
from provisioning.registry import DeviceEventInfo, DeviceInfo, DeviceRegistry, DeviceStatus
from provisioning.registry.labels import MAX_LABELS, LabelKey, LabelValue
from provisioning.registry.repository import MAX_PAGE
from provisioning.registry.transfer import FIRMWARE_MAX, NOTE_MAX

router = APIRouter(prefix="/devices", tags=["devices"])

#: The furthest a page may start: past any real fleet, short of what a database cannot count.
MAX_OFFSET = 1_000_000_000
MAX_EVENTS = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Text = StringConstraints(strip_whitespace=True, pattern=r"^[^\x00-\x1f\x7f]*$")

DevicePath = Annotated[
    str,
    Path(
        max_length=64,
        description="The device's id, MAC address (any notation) or MQTT username.",
        examples=["02:00:00:00:00:01"],
    ),
]

_NOT_FOUND = problems(NOT_FOUND="No such device.")
_CONFLICT = problems(CONFLICT="Not in a status that allows it.")


class DeviceList(BaseModel):
    """One page of devices, oldest first, and how many match in all."""

    devices: list[DeviceInfo]
    total: int = Field(description="Devices matching the filter, exact.")
    limit: int
    offset: int
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last.")


class DeviceDetail(BaseModel):
    """One device and its most recent audit events, newest first."""

    device: DeviceInfo
    events: list[DeviceEventInfo]


class NewDevice(BaseModel):
    """A MAC allowed to enrol (status ``approved``): what allowlist mode checks."""

    model_config = ConfigDict(extra="forbid")

    mac: Annotated[str, StringConstraints(max_length=64)] = Field(examples=["02:00:00:00:00:01"])
    firmware_version: Annotated[str, Text, StringConstraints(max_length=FIRMWARE_MAX)] | None = None
    note: Annotated[str, Text, StringConstraints(max_length=NOTE_MAX)] | None = None
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, examples=[{"site": "berlin"}]
    )


async def find(registry: DeviceRegistry, device: str) -> DeviceInfo:
    """The device ``device`` names, as the CLI finds it; 404 for text that names none."""
    if _CONTROL.search(device):
        raise DeviceNotFoundError(f"no device matches {device!r}")
    try:
        return await registry.resolve(device)
    except InvalidMacError as exc:
        raise DeviceNotFoundError(
            f"no device matches {device.strip()!r} (give a device id, a MAC address or a username)"
        ) from exc


@router.get("", summary="List devices")
async def list_devices(
    services: Services,
    _token: Reader,
    wanted: Filter,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Devices per page (at most 1000).")] = 50,
    offset: Annotated[
        int, Query(ge=0, le=MAX_OFFSET, description="Devices to skip first (after the cursor, if any).")
    ] = 0,
    after: Annotated[
        str | None,
        Query(max_length=256, description="A page's `next_cursor`: the page after it, at any depth."),
    ] = None,
) -> DeviceList:
    """One page of the devices matching every filter given, oldest first, with the exact total.

    Deep pages: follow ``next_cursor`` (``after``), which costs the same at any depth, rather
    than a growing ``offset``.
    """
    page = await services.registry.search_devices(wanted, limit=limit, offset=offset, after=after)
    return DeviceList(
        devices=page.devices, total=page.total, limit=limit, offset=offset, next_cursor=page.next_cursor
    )


@router.post(
    "",
    status_code=HTTPStatus.CREATED,
    summary="Allow a MAC to enrol",
    responses=problems(CONFLICT="A device with this MAC exists."),
)
async def add_device(services: Services, _token: Writer, body: NewDevice) -> DeviceInfo:
    """Pre-register a MAC (status ``approved``): in allowlist mode only such MACs may enrol."""
    registry = services.registry
    return await registry.add_allowed(
        body.mac, firmware_version=body.firmware_version, note=body.note, labels=body.labels
    )


@router.get("/{device}", summary="Show a device", responses=_NOT_FOUND)
async def get_device(
    services: Services,
    _token: Reader,
    device: DevicePath,
    events: Annotated[int, Query(ge=0, le=MAX_EVENTS, description="Most recent events to include.")] = 20,
) -> DeviceDetail:
    """One device (never its password hash) and its most recent audit events."""
    found = await find(services.registry, device)
    history = await services.registry.events(found.id, limit=events) if events else []
    return DeviceDetail(device=found, events=history)


Change = Callable[[DeviceRegistry, DeviceInfo], Awaitable[DeviceInfo]]


async def _change(
    services: Services, device: str, change: Change, *, target: DeviceStatus | None
) -> DeviceInfo:
    found = await find(services.registry, device)
    if found.status is target:  # approved or rejected already: nothing to change (as the CLI)
        return found
    return await change(services.registry, found)


@router.post("/{device}/approve", summary="Approve a device", responses=_NOT_FOUND | _CONFLICT)
async def approve(services: Services, _token: Writer, device: DevicePath) -> DeviceInfo:
    """Let a pending or rejected device enrol on its next request (approved already: no change)."""
    return await _change(services, device, lambda r, d: r.approve(d.id), target=DeviceStatus.APPROVED)


@router.post("/{device}/reject", summary="Reject a device", responses=_NOT_FOUND | _CONFLICT)
async def reject(services: Services, _token: Writer, device: DevicePath) -> DeviceInfo:
    """Refuse a pending or approved (not yet enrolled) device (rejected already: no change)."""
    return await _change(services, device, lambda r, d: r.reject(d.id), target=DeviceStatus.REJECTED)


@router.post("/{device}/reset", summary="Reset a device's credentials", responses=_NOT_FOUND | _CONFLICT)
async def reset(services: Services, _token: Writer, device: DevicePath) -> DeviceInfo:
    """Revoke the device's credentials now (its sessions are ended) and allow one new enrolment."""
    return await _change(services, device, lambda r, d: r.reset(d.id), target=None)


@router.post("/{device}/decommission", summary="Decommission a device", responses=_NOT_FOUND)
async def decommission(services: Services, _token: Writer, device: DevicePath) -> DeviceInfo:
    """Retire the device: its credentials stop working and its sessions are ended within 2 s."""
    return await _change(services, device, lambda r, d: r.decommission(d.id), target=None)


@router.delete("/{device}", summary="Delete a device", responses=_NOT_FOUND)
async def delete_device(services: Services, _token: Writer, device: DevicePath) -> DeviceInfo:
    """Delete the device's row (its audit events stay); returns the device as it was."""
    return await _change(services, device, lambda r, d: r.delete(d.id), target=None)
