"""``/api/v1/devices/{device}/labels``: set, merge and remove a device's ``key=value`` labels.

Through :meth:`DeviceRegistry.set_labels`, as ``mqttprov devices label``: one transaction, one
``labelled`` audit event, the charset and the cap of :mod:`provisioning.registry.labels`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from broker.http.api.context import Services
from broker.http.api.devices import DevicePath, find
from broker.http.api.problems import problems
from broker.http.api.security import Writer
from provisioning.registry import MAX_LABELS, DeviceInfo, LabelKey, LabelValue
from provisioning.registry.labels import validate_label_key

router = APIRouter(prefix="/devices", tags=["labels"])

_NOT_FOUND = problems(NOT_FOUND="No such device.")


class LabelChange(BaseModel):
    """Labels to set on a device: merged into its labels, or replacing them all."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[LabelKey, LabelValue] = Field(max_length=MAX_LABELS, examples=[{"site": "berlin"}])
    replace: bool = Field(
        default=False,
        description="true: the device keeps only these labels; false (default): these are set, "
        "the others kept.",
    )


@router.put("/{device}/labels", summary="Set a device's labels", responses=_NOT_FOUND)
async def set_labels(services: Services, _token: Writer, device: DevicePath, body: LabelChange) -> DeviceInfo:
    """Set these labels (a key the device has gets the new value); with ``replace``, drop the rest."""
    found = await find(services.registry, device)
    remove = set(found.labels) - set(body.labels) if body.replace else set()
    return await services.registry.set_labels(found.id, body.labels, remove=remove)


LabelKeyPath = Annotated[str, Path(max_length=63, description="The label's key.", examples=["site"])]


@router.delete("/{device}/labels/{key}", summary="Remove a label", responses=_NOT_FOUND)
async def remove_label(
    services: Services, _token: Writer, device: DevicePath, key: LabelKeyPath
) -> DeviceInfo:
    """Remove one label; a key the device does not carry is no error (nothing changes).

    A key outside the label charset is ``422 INVALID_LABEL``.
    """
    found = await find(services.registry, device)
    if key not in found.labels:
        validate_label_key(key)  # a key no device could carry is a 422, not a silent no-op
        return found
    return await services.registry.set_labels(found.id, {}, remove=[key])
