"""``/health`` and ``/ready``: for load balancers and orchestrators; no token needed."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from broker.http.api.context import Services
from broker.http.api.problems import problems

router = APIRouter(tags=["health"])


class Health(BaseModel):
    """The process answers (``/health``), or the registry answers too (``/ready``)."""

    status: Literal["ok"] = "ok"


@router.get("/health", summary="Liveness")
async def health() -> Health:
    """The process is up and answering HTTP."""
    return Health()


@router.get(
    "/ready",
    summary="Readiness",
    responses=problems(SERVICE_UNAVAILABLE="The registry is unavailable."),
)
async def ready(services: Services) -> Health:
    """The registry answers a read: requests can be served (503 with ``Retry-After`` if not)."""
    await services.registry.last_change_id()
    return Health()
