"""Every route of the API against no token, a token with every scope but its own, and its scope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from provisioning.registry.tokens import Scope
from tests.api_support import Api, api_settings, assert_problem, running_api

MAC = "02:00:00:00:c0:01"
FLEET_SECRET = "fleet-secret-for-api-tests-0123456789"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    scope: Scope
    body: Any = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = [
    Route("GET", "/api/v1/devices", Scope.READ),
    Route("POST", "/api/v1/devices", Scope.WRITE, {"mac": "02:00:00:00:c0:02"}),
    Route("GET", "/api/v1/devices/{device}", Scope.READ),
    Route("POST", "/api/v1/devices/{device}/approve", Scope.WRITE),
    Route("POST", "/api/v1/devices/{device}/reject", Scope.WRITE),
    Route("POST", "/api/v1/devices/{device}/reset", Scope.WRITE),
    Route("POST", "/api/v1/devices/{device}/decommission", Scope.WRITE),
    Route("DELETE", "/api/v1/devices/{device}", Scope.WRITE),
    Route("GET", "/api/v1/devices/export", Scope.READ),
    Route("POST", "/api/v1/devices/import", Scope.WRITE, [{"mac": "02:00:00:00:c0:04"}]),
    Route("PUT", "/api/v1/devices/{device}/labels", Scope.WRITE, {"labels": {"site": "berlin"}}),
    Route("DELETE", "/api/v1/devices/{device}/labels/{key}", Scope.WRITE),
    Route("GET", "/api/v1/devices/{device}/events", Scope.READ),
    Route("GET", "/api/v1/events/stream", Scope.READ),
    Route("GET", "/api/v1/accounts", Scope.READ),
    Route("POST", "/api/v1/accounts", Scope.WRITE, {"name": "backend", "allow": []}),
    Route("POST", "/api/v1/accounts/{name}/rotate", Scope.WRITE),
    Route("DELETE", "/api/v1/accounts/{name}", Scope.WRITE),
    # With [provisioning] auth set, a back end may provision with a token of this scope.
    Route("POST", "/api/v1/provision", Scope.PROVISION, {"mac": "02:00:00:00:c0:03"}),
]
#: Anonymous by design: probes, and devices proving themselves by [provisioning] auth.
# /metrics too, by default ([api] metrics = "open"; tests/test_metrics.py covers "token").
ANONYMOUS = {"GET /health", "GET /ready", "GET /metrics"}


async def _call(api: Api, route: Route, headers: dict[str, str]) -> Any:
    path = route.path.format(device=MAC, name="existing", key="site")
    request = api.client.build_request(route.method, path, json=route.body, headers=headers)
    # Streamed: the event stream does not end; its status and headers are what is checked.
    response = await api.client.send(request, stream=True)
    try:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
    finally:
        await response.aclose()
    return response


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_a_route_needs_a_token_holding_its_own_scope(sqlite_url: str, route: Route) -> None:
    settings = api_settings(sqlite_url, provisioning={"auth": "fleet_secret", "fleet_secret": FLEET_SECRET})
    async with running_api(settings) as api:
        await api.server.services.registry.add_allowed(MAC)
        await api.server.services.accounts.add("existing", "$2b$04$" + "x" * 53, [])

        assert_problem(await _call(api, route, {}), 401, "UNAUTHORIZED")
        garbage = {"Authorization": "Bearer mqp_" + "A" * 43}
        assert_problem(await _call(api, route, garbage), 401, "UNAUTHORIZED")
        others = [scope for scope in Scope if scope is not route.scope]
        wrong = await _call(api, route, await api.headers(*others))
        assert_problem(wrong, 403, "FORBIDDEN")
        right = await _call(api, route, await api.headers(route.scope))
        assert right.status_code < 300, right.text


async def test_the_matrix_covers_every_route_of_the_openapi_document(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        document = (await api.client.get("/openapi.json")).json()
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert documented == {str(route) for route in ROUTES} | ANONYMOUS


async def test_without_provisioning_auth_http_provisioning_is_anonymous_like_mqtt(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        response = await api.client.post("/api/v1/provision", json={"mac": MAC})
        assert response.status_code == 200, response.text
