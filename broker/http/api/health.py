"""``/health`` and ``/ready``: for load balancers and orchestrators; no token needed."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from broker.http.api.context import Services
from broker.http.api.problems import RETRY_AFTER, ApiError, problems
from provisioning.errors import RegistryUnavailableError

#: Seconds the registry has to answer ``/ready``: a stalled database is not ready either.
READY_TIMEOUT = 5.0

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
    responses=problems(
        SERVICE_UNAVAILABLE="The registry is unavailable, or (in `serve`) the MQTT listener is not up."
    ),
)
async def ready(services: Services) -> Health:
    """The registry answers a read within 5 s and, in ``mqttprov serve``, every MQTT listener
    accepts connections: requests can be served (503 with ``Retry-After`` if not)."""
    if services.listening is not None and not services.listening():
        raise ApiError(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "the MQTT listener is not accepting connections",
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await services.registry.last_change_id()
    except TimeoutError as exc:
        raise RegistryUnavailableError(f"no answer within {READY_TIMEOUT:g}s") from exc
    return Health()
