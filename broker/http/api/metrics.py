"""``GET /metrics``: the host process's Prometheus metrics (docs/operations/metrics.md).

``[api] metrics`` decides who may read them: ``open`` (the default) answers anyone who reaches
the port, as ``/health`` does: the metrics count things and name no device, address or secret,
and a scraper usually presents nothing. ``token`` asks for a ``read``-scope API token (Prometheus'
``authorization`` scrape setting), for an API that faces a network its operator does not trust;
``off`` answers 404.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Request, Response

from broker.http.api.context import Services
from broker.http.api.problems import ApiError, problems
from broker.http.api.security import PresentedToken, require
from broker.metrics import render
from provisioning.registry.tokens import Scope

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "The Prometheus text format."},
        **problems(
            UNAUTHORIZED='`[api] metrics = "token"` and no valid token.',
            FORBIDDEN='`[api] metrics = "token"` and the token lacks the read scope.',
            NOT_FOUND='`[api] metrics = "off"`.',
        ),
    },
)
async def metrics(request: Request, services: Services, token: PresentedToken) -> Response:
    """The process's metrics; OpenMetrics when the ``Accept`` header asks for it."""
    mode = services.settings.api.metrics
    if mode == "off" or services.metrics is None:
        raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", "metrics are not served here ([api] metrics)")
    if mode == "token":
        await require(Scope.READ)(token)
    body, content_type = render(services.metrics, request.headers.get("accept"))
    return Response(body, media_type=content_type)
