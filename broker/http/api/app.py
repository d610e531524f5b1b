"""The API's FastAPI application, built over services its host already runs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

from broker.http.api import accounts, devices, events, health, labels, metrics, provision, transfer
from broker.http.api.context import ApiServices
from broker.http.api.limits import ApiLimits
from broker.http.api.problems import PROBLEM_JSON, BodyLimit, install_handlers, problems

#: Where the management routes live; a breaking change would get /api/v2.
PREFIX = "/api/v1"

_DESCRIPTION = """\
Manage mqttprov's devices and service accounts, and provision devices over HTTP.

Every route but `/health`, `/ready` and `POST /api/v1/provision` needs an API token
(`Authorization: Bearer <token>`) holding the route's scope: `read`, `write` or `provision`
(explicit: `write` does not imply `read`). Errors are RFC 7807 `application/problem+json`
documents with a stable `error_code`. See docs/api.md.
"""


def create_app(services: ApiServices, *, version: str = "1", console: bool | None = None) -> FastAPI:
    """The API over ``services``, which the caller owns (started before, closed after the app).

    ``mqttprov serve`` and ``mqttprov api`` both host it: the same routes on the same registry.
    ``console``: the operator console under ``/`` too (default: ``[api] console``).
    """
    app = FastAPI(
        title="mqttprov management API",
        version=version,
        description=_DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.services = services
    app.state.limits = ApiLimits.build(services.settings)
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=services.settings.api.max_body_bytes)
    # What every route may answer besides its own: a bad request, a body over the limit.
    common = problems(
        BAD_REQUEST="The body cannot be parsed at all.",
        UNPROCESSABLE_ENTITY="A parameter or the body is not valid.",
        REQUEST_ENTITY_TOO_LARGE="The body is over [api] max_body_bytes.",
    )
    secured = problems(UNAUTHORIZED="No valid API token.", FORBIDDEN="The token lacks the route's scope.")
    api = APIRouter(prefix=PREFIX)
    # /devices/export before /devices/{device}: the first route that matches answers.
    api.include_router(transfer.router, responses=common | secured)
    api.include_router(devices.router, responses=common | secured)
    api.include_router(labels.router, responses=common | secured)
    api.include_router(events.router, responses=common | secured)
    api.include_router(accounts.router, responses=common | secured)
    api.include_router(provision.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(api)
    if services.settings.api.console if console is None else console:
        # Jinja2 and the console's templates only when it is served.
        from broker.http.console import install_console  # noqa: PLC0415

        install_console(app, services)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with problem answers under their own media type."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for item in document.get("paths", {}).values():
            for operation in item.values():
                for response in operation.get("responses", {}).values():
                    _problem_media_type(response)
        app.openapi_schema = document
    return app.openapi_schema


def _problem_media_type(response: dict[str, Any]) -> None:
    content = response.get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    if schema.get("$ref", "").endswith("/Problem"):
        content[PROBLEM_JSON] = content.pop("application/json")
