"""The HTTP management API's routes against a real server: devices, accounts, errors, health."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import bcrypt
import httpx
import pytest
import schemathesis

from broker.http.api.hosted import BrokerWithApi
from provisioning.registry.tokens import Scope
from tests.api_support import Api, api_settings, assert_problem, running_api
from tests.mqtt_clients import ACCEPTED, login

MAC = "02:00:00:00:a0:01"
READ_WRITE = (Scope.READ, Scope.WRITE)


@pytest.fixture
async def api(sqlite_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(sqlite_url)) as running:
        yield running


async def test_health_and_readiness_need_no_token(api: Api) -> None:
    for path in ("/health", "/ready"):
        response = await api.client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


async def test_the_openapi_document_is_valid_and_lists_every_route(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    schemathesis.openapi.from_dict(document).validate()
    paths = set(document["paths"])
    assert {
        "/health",
        "/ready",
        "/api/v1/devices",
        "/api/v1/devices/{device}",
        "/api/v1/devices/{device}/decommission",
        "/api/v1/accounts",
        "/api/v1/accounts/{name}/rotate",
        "/api/v1/provision",
    } <= paths
    docs = await api.client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_a_device_through_its_life(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    added = await api.client.post("/api/v1/devices", json={"mac": MAC, "note": "bench 3"}, headers=headers)
    assert added.status_code == 201, added.text
    device = added.json()
    assert device["status"] == "approved"
    assert device["note"] == "bench 3"
    assert "password_hash" not in device

    again = await api.client.post("/api/v1/devices", json={"mac": MAC.upper()}, headers=headers)
    assert_problem(again, 409, "ALREADY_EXISTS")

    for name in (device["id"], MAC, MAC.replace(":", "-"), device["mqtt_username"]):
        shown = await api.client.get(f"/api/v1/devices/{name}", headers=headers)
        assert shown.status_code == 200, shown.text
        assert shown.json()["device"]["id"] == device["id"]
        assert [e["kind"] for e in shown.json()["events"]] == ["added"]

    approved = await api.client.post(f"/api/v1/devices/{MAC}/approve", headers=headers)
    assert approved.json()["status"] == "approved"  # already: nothing changed, as the CLI
    rejected = await api.client.post(f"/api/v1/devices/{MAC}/reject", headers=headers)
    assert rejected.json()["status"] == "rejected"
    decommissioned = await api.client.post(f"/api/v1/devices/{MAC}/decommission", headers=headers)
    assert decommissioned.json()["status"] == "decommissioned"
    refused = await api.client.post(f"/api/v1/devices/{MAC}/reset", headers=headers)
    assert_problem(refused, 409, "INVALID_TRANSITION")

    deleted = await api.client.delete(f"/api/v1/devices/{MAC}", headers=headers)
    assert deleted.status_code == 200
    assert deleted.json()["id"] == device["id"]
    gone = await api.client.get(f"/api/v1/devices/{device['id']}", headers=headers)
    assert_problem(gone, 404, "NOT_FOUND")


async def test_a_listing_pages_with_an_exact_total_and_filters_by_status(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    for index in range(5):
        await api.client.post("/api/v1/devices", json={"mac": f"02:00:00:00:b0:0{index}"}, headers=headers)
    await api.client.post("/api/v1/devices/02:00:00:00:b0:04/reject", headers=headers)

    page = (await api.client.get("/api/v1/devices?limit=2&offset=1", headers=headers)).json()
    assert page["total"] == 5
    assert [d["mac"] for d in page["devices"]] == ["02:00:00:00:b0:01", "02:00:00:00:b0:02"]
    assert (page["limit"], page["offset"]) == (2, 1)
    rejected = (await api.client.get("/api/v1/devices?status=rejected", headers=headers)).json()
    assert rejected["total"] == 1
    assert rejected["devices"][0]["mac"] == "02:00:00:00:b0:04"

    over_cap = await api.client.get("/api/v1/devices?limit=1001", headers=headers)
    body = assert_problem(over_cap, 422, "INVALID_REQUEST")
    assert body["detail"].startswith("query.limit: ")
    unknown = await api.client.get("/api/v1/devices?status=sleeping", headers=headers)
    assert_problem(unknown, 422, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("body", "code", "where"),
    [
        pytest.param({}, "INVALID_REQUEST", "body.mac: Field required", id="mac-missing"),
        pytest.param({"mac": "zz"}, "INVALID_MAC", "", id="mac-invalid"),
        pytest.param({"mac": "ff:ff:ff:ff:ff:ff"}, "INVALID_MAC", "", id="mac-broadcast"),
        pytest.param({"mac": MAC, "note": "n" * 257}, "INVALID_REQUEST", "body.note: ", id="note-long"),
        pytest.param({"mac": MAC, "firmware_version": "1\x00"}, "INVALID_REQUEST", "body.firmware", id="nul"),
        pytest.param({"mac": MAC, "owner": "x"}, "INVALID_REQUEST", "body.owner: ", id="unknown-field"),
        pytest.param([MAC], "INVALID_REQUEST", "body: ", id="not-an-object"),
    ],
)
async def test_a_bad_device_is_a_clear_422(api: Api, body: object, code: str, where: str) -> None:
    response = await api.client.post("/api/v1/devices", json=body, headers=await api.headers(Scope.WRITE))
    problem = assert_problem(response, 422, code)
    assert problem["detail"].startswith(where)


async def test_malformed_json_and_unknown_routes_are_problems_too(api: Api) -> None:
    headers = await api.headers(*READ_WRITE) | {"Content-Type": "application/json"}
    broken = await api.client.post("/api/v1/devices", content=b'{"mac": ', headers=headers)
    assert_problem(broken, 422, "INVALID_REQUEST")
    assert_problem(await api.client.get("/api/v1/nothing", headers=headers), 404, "NOT_FOUND")
    assert_problem(await api.client.put("/api/v1/devices", headers=headers), 405, "METHOD_NOT_ALLOWED")
    nul = await api.client.get("/api/v1/devices/device_%00", headers=headers)
    assert_problem(nul, 404, "NOT_FOUND")


async def test_a_body_over_the_limit_is_413_before_it_is_read(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url, api={"max_body_bytes": 2048})) as api:
        headers = await api.headers(Scope.WRITE)
        declared = await api.client.post("/api/v1/devices", content=b"x" * 4096, headers=headers)
        body = assert_problem(declared, 413, "PAYLOAD_TOO_LARGE")
        assert "2048" in body["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(4):
                yield b"x" * 1024

        streamed = await api.client.post("/api/v1/devices", content=chunks(), headers=headers)
        assert_problem(streamed, 413, "PAYLOAD_TOO_LARGE")
        # The server still serves.
        assert (await api.client.get("/health")).status_code == 200


async def test_accounts_passwords_are_shown_once_and_work(api: Api) -> None:
    headers = await api.headers(*READ_WRITE)
    rules = [{"action": "subscribe", "filter": "devices/+/telemetry"}]
    created = await api.client.post(
        "/api/v1/accounts", json={"name": "telemetry", "allow": rules}, headers=headers
    )
    assert created.status_code == 201, created.text
    issued = created.json()
    assert issued["account"]["allow"] == rules
    stored = await api.server.services.accounts.find("telemetry")
    assert stored is not None
    assert bcrypt.checkpw(issued["password"].encode(), stored.password_hash.encode())

    listed = (await api.client.get("/api/v1/accounts", headers=headers)).json()
    assert [a["name"] for a in listed["accounts"]] == ["telemetry"]
    assert "password" not in listed["accounts"][0]

    rotated = await api.client.post("/api/v1/accounts/telemetry/rotate", headers=headers)
    assert rotated.status_code == 200
    assert rotated.json()["password"] != issued["password"]
    taken = await api.client.post(
        "/api/v1/accounts", json={"name": "telemetry", "allow": []}, headers=headers
    )
    assert_problem(taken, 409, "ALREADY_EXISTS")
    invalid = await api.client.post(
        "/api/v1/accounts", json={"name": "device_x", "allow": []}, headers=headers
    )
    assert_problem(invalid, 422, "INVALID_ACCOUNT")
    bad_rule = [{"action": "publish", "filter": "a/#/b"}]
    refused = await api.client.post(
        "/api/v1/accounts", json={"name": "x1", "allow": bad_rule}, headers=headers
    )
    assert_problem(refused, 422, "INVALID_REQUEST")

    removed = await api.client.delete("/api/v1/accounts/telemetry", headers=headers)
    assert removed.status_code == 204
    assert_problem(await api.client.delete("/api/v1/accounts/telemetry", headers=headers), 404, "NOT_FOUND")
    assert_problem(
        await api.client.post("/api/v1/accounts/telemetry/rotate", headers=headers), 404, "NOT_FOUND"
    )


async def test_tokens_are_checked_on_every_request(api: Api) -> None:
    secret = await api.token(Scope.READ)
    headers = {"Authorization": f"Bearer {secret}"}
    assert (await api.client.get("/api/v1/devices", headers=headers)).status_code == 200
    await api.server.services.tokens.revoke(uuid.UUID(str((await api.server.services.tokens.list())[0].id)))
    refused = await api.client.get("/api/v1/devices", headers=headers)
    assert_problem(refused, 401, "UNAUTHORIZED")
    assert refused.headers["www-authenticate"].startswith("Bearer")


async def test_a_stopped_server_refuses_connections(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        url = api.server.url
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(url + "/health")


async def test_serve_hosts_the_api_on_the_brokers_own_services(sqlite_url: str) -> None:
    settings = api_settings(sqlite_url, api={"enabled": True})
    async with BrokerWithApi(settings) as served, httpx.AsyncClient(base_url=served.api.url) as client:
        assert served.api.settings.port != 0
        creds = (await client.post("/api/v1/provision", json={"mac": MAC})).json()
        assert creds["mqtt_port"] == served.broker.settings.broker.port  # the broker's bound port
        port = served.broker.settings.broker.port
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED
        issued = await served.broker.registry.find_by_mac(MAC)
        assert issued is not None
        assert issued.status.value == "registered"
