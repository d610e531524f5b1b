"""``/approvals``: devices waiting for an operator (approval mode); approve or reject one or many.

New requests appear by themselves (the rows are polled). Each decision is the registry's
``approve``/``reject``, as ``mqttprov devices approve`` makes it: the device gets its
credentials, or NOT_ALLOWED, on its next request.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from broker.http.console.render import done, page, when
from broker.http.console.security import ConsoleDep, Post, Session
from provisioning.errors import ProvisioningError
from provisioning.registry import DeviceFilter, DeviceStatus

router = APIRouter(prefix="/approvals", include_in_schema=False)

#: Requests shown at once, oldest first; the rest follow as these are decided.
QUEUE = 200
_PENDING = DeviceFilter(status=frozenset({DeviceStatus.PENDING}))


@router.get("")
async def queue(
    request: Request,
    console: ConsoleDep,
    session: Session,
    *,
    fragment: Annotated[str, Query(max_length=1)] = "",
    approved: Annotated[int, Query(ge=0)] = 0,
    rejected: Annotated[int, Query(ge=0)] = 0,
    failed: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """The waiting devices, oldest first; ``?fragment=1``: only the rows (polled)."""
    found = await console.services.registry.search_devices(_PENDING, limit=QUEUE)
    parts = [f"{n} {what}" for n, what in ((approved, "approved"), (rejected, "rejected")) if n]
    notice = ", ".join(parts).capitalize() + "." if parts else None
    error = f"{failed} could not be changed (no longer waiting)." if failed else None
    template = "_approval_rows.html" if fragment else "approvals.html"
    return page(
        request,
        template,
        session,
        notice=notice,
        error=error,
        devices=found.devices,
        total=found.total,
        when=when,
    )


@router.post("")
async def decide(console: ConsoleDep, posted: Post) -> Response:
    """Approve or reject the devices ticked (or the one whose own button was pressed)."""
    # A row's own button says "approve:<id>"; the buttons above the list act on the ticked rows.
    action, _, only = posted.get("only").partition(":")
    chosen = [only] if only else posted.all("device")
    action = action or posted.get("action")
    if action not in {"approve", "reject"}:
        return done("/approvals", "nothing")
    registry = console.services.registry
    change = registry.approve if action == "approve" else registry.reject
    changed = failed = 0
    for text in chosen:
        try:
            await change(uuid.UUID(text))
            changed += 1
        except (ValueError, ProvisioningError):
            failed += 1
    key = "approved" if action == "approve" else "rejected"
    return done(f"/approvals?{key}={changed}&failed={failed}", "queue")
