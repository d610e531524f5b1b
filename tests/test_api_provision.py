"""The provisioning contract over HTTP: the MQTT contract's cases, policies and proofs, answered
by the same service with the same ``error_code``s and a matching HTTP status."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.embedded import BrokerServer
from provisioning.keys import derive_device_key
from provisioning.registry.tokens import Scope
from tests.api_support import Api, api_settings, assert_problem, running_api
from tests.mqtt_clients import ACCEPTED, assert_ok, device_session, login

CORPUS = Path(__file__).parent / "corpus" / "payloads"
MAC = "02:00:00:00:d0:01"
FLEET_SECRET = "fleet-secret-for-api-tests-0123456789"
MASTER = "device-key-master-for-api-tests-0123456789"
STATUS = {"INVALID_PAYLOAD": 400, "INVALID_MAC": 400, "PAYLOAD_TOO_LARGE": 413}


def error(response: httpx.Response, status: int, code: str, *, retry_after: bool = False) -> dict[str, Any]:
    """Check a contract ``error`` reply sent with ``status``: the MQTT reply's exact shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["status"] == "error", body
    assert body["error_code"] == code, body
    assert set(body) <= {"status", "error_code", "detail", "retry_after", "request_id"}, body
    assert ("retry_after" in body) == retry_after, body
    if retry_after:
        assert response.headers["retry-after"] == str(body["retry_after"])
    return body


async def provision(api: Api, payload: Any, **kw: Any) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else None
    return await api.client.post(
        "/api/v1/provision", content=content, json=None if content is not None else payload, **kw
    )


def corpus() -> list[Path]:
    """The MQTT contract's kept cases, but MAC_MISMATCH: over HTTP the request's MAC is the identity."""
    return sorted(case for case in CORPUS.glob("*--*.bin") if not case.name.startswith("MAC_MISMATCH"))


async def test_every_corpus_case_gets_its_code_and_status_and_nothing_is_stored(sqlite_url: str) -> None:
    cases = corpus()
    assert len(cases) >= 50
    async with running_api(api_settings(sqlite_url)) as api:
        for case in cases:
            code = case.name.split("--", 1)[0]
            body = error(await provision(api, case.read_bytes()), STATUS[code], code)
            assert "request_id" not in body, case.name
        assert (await api.server.services.registry.list_devices(limit=1)).total == 0


async def test_an_ok_reply_over_http_logs_in_on_the_broker_and_decommission_throws_it_off(
    broker: BrokerServer,
) -> None:
    # The API is a process of its own here (engine, feed) on the broker's registry file.
    settings = api_settings(broker.settings.database.url)
    port = broker.settings.broker.port
    async with running_api(settings) as api:
        response = await provision(api, {"mac": MAC, "request_id": "h1"})
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        creds = response.json()
        assert_ok(creds, "h1")
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED

        session = await asyncio.to_thread(device_session, port, creds)
        try:
            headers = await api.headers(Scope.WRITE)
            done = await api.client.post(f"/api/v1/devices/{MAC}/decommission", headers=headers)
            assert done.status_code == 200, done.text
            thrown_off = await asyncio.to_thread(session.disconnected.wait, 2.0)
        finally:
            await asyncio.to_thread(session.close)
        assert thrown_off, "the device was not disconnected within 2 s of the decommission"
        error(await provision(api, {"mac": MAC}), 410, "DECOMMISSIONED")


async def test_policies_answer_as_over_mqtt_with_a_matching_status(sqlite_url: str) -> None:
    settings = api_settings(sqlite_url, provisioning={"mode": "approval", "reissue_cooldown": 60})
    async with running_api(settings) as api:
        pending = await provision(api, {"mac": MAC})
        assert pending.status_code == 202
        assert pending.json()["status"] == "pending"
        assert pending.headers["retry-after"] == str(pending.json()["retry_after"])

        registry = api.server.services.registry
        device = await registry.resolve(MAC)
        await registry.reject(device.id)
        body = error(await provision(api, {"mac": MAC, "request_id": "r"}), 403, "NOT_ALLOWED")
        assert body["request_id"] == "r"

        await registry.approve(device.id)
        assert (await provision(api, {"mac": MAC})).status_code == 200
        error(await provision(api, {"mac": MAC}), 429, "RATE_LIMITED", retry_after=True)


async def test_a_provisioned_device_that_logged_in_is_already_provisioned(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        creds = (await provision(api, {"mac": MAC})).json()
        await api.server.services.registry.mark_activated(uuid.UUID(creds["device_id"]))
        error(await provision(api, {"mac": MAC}), 409, "ALREADY_PROVISIONED")


async def test_a_mac_that_asks_too_often_is_rate_limited(sqlite_url: str) -> None:
    options = {"mode": "allowlist", "mac_burst": 2, "mac_requests_per_minute": 1}
    async with running_api(api_settings(sqlite_url, provisioning=options)) as api:
        codes = [(await provision(api, {"mac": MAC})).json()["error_code"] for _ in range(3)]
        assert codes == ["NOT_ALLOWED", "NOT_ALLOWED", "RATE_LIMITED"]


async def test_fleet_secret_is_http_basic_provision_and_the_secret(sqlite_url: str) -> None:
    options = {"auth": "fleet_secret", "fleet_secret": FLEET_SECRET}
    async with running_api(api_settings(sqlite_url, provisioning=options)) as api:
        assert_problem(await provision(api, {"mac": MAC}), 401, "UNAUTHORIZED")
        wrong = await provision(api, {"mac": MAC}, auth=("provision", "wrong"))
        assert_problem(wrong, 401, "UNAUTHORIZED")
        other_user = await provision(api, {"mac": MAC}, auth=("admin", FLEET_SECRET))
        assert_problem(other_user, 401, "UNAUTHORIZED")
        assert (await api.server.services.registry.list_devices(limit=1)).total == 0

        ok = await provision(api, {"mac": MAC}, auth=("provision", FLEET_SECRET))
        assert ok.status_code == 200, ok.text
        assert_ok(ok.json())
        # A request that names no MAC is refused by the contract, proof or not: nothing is issued.
        error(await provision(api, {"mac": "zz"}), 400, "INVALID_MAC")


async def test_device_key_is_derived_from_the_requests_mac(sqlite_url: str) -> None:
    options = {"auth": "device_key", "device_key_secret": MASTER}
    async with running_api(api_settings(sqlite_url, provisioning=options)) as api:
        others = derive_device_key(MASTER, "02:00:00:00:d0:02")
        refused = await provision(api, {"mac": MAC}, auth=("provision", others))
        assert_problem(refused, 401, "UNAUTHORIZED")
        key = derive_device_key(MASTER, MAC)
        # The key belongs to the MAC, not to how the request writes it.
        ok = await provision(api, {"mac": MAC.replace(":", "-").upper()}, auth=("provision", key))
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("scopes", [(Scope.READ, Scope.WRITE), ()])
async def test_a_token_stands_in_for_the_proof_only_with_the_provision_scope(
    sqlite_url: str, scopes: tuple[Scope, ...]
) -> None:
    options = {"auth": "fleet_secret", "fleet_secret": FLEET_SECRET}
    async with running_api(api_settings(sqlite_url, provisioning=options)) as api:
        held = await api.headers(*scopes) if scopes else {"Authorization": "Bearer not-a-token"}
        refused = await provision(api, {"mac": MAC}, headers=held)
        assert_problem(refused, 403 if scopes else 401, "FORBIDDEN" if scopes else "UNAUTHORIZED")
        ok = await provision(api, {"mac": MAC}, headers=await api.headers(Scope.PROVISION))
        assert ok.status_code == 200, ok.text
