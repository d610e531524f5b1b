"""Provisioning policy end to end: modes, proofs, re-provisioning and rate limits."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from broker.embedded import BrokerServer
from provisioning.keys import derive_device_key
from provisioning.registry import DeviceStatus
from tests.helpers import connack_code
from tests.mqtt_clients import (
    ACCEPTED,
    BAD_USERNAME_OR_PASSWORD,
    HOST,
    NOT_AUTHORIZED,
    REPLY_PREFIX,
    WAIT,
    Received,
    assert_error,
    assert_ok,
    device_count,
    device_session,
    enrol,
    login,
    provision,
    provisioning_broker,
    provisioning_session,
    provisioning_settings,
)

MAC = "02:00:00:00:10:01"
REFUSED = {BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED}
TOPIC = REPLY_PREFIX + MAC


def ok(reply: Received | None, request_id: str | None = None) -> dict[str, Any]:
    """The body of an ``ok`` reply on the MAC's topic (fails the test otherwise)."""
    assert reply is not None
    assert reply.topic == TOPIC
    body = reply.json()
    assert body["status"] == "ok", body
    assert_ok(body, request_id)
    return body


# -- modes ---------------------------------------------------------------------------------------------


async def test_allowlist_refuses_unknown_macs_and_enrols_listed_ones(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, mode="allowlist") as server:
        port = server.settings.broker.port
        refused = await asyncio.to_thread(provision, port, MAC, {"mac": MAC, "request_id": "a1"})
        body = assert_error(refused, "NOT_ALLOWED", topic=TOPIC)
        assert body["request_id"] == "a1"
        assert await device_count(server) == 0

        listed = await server.registry.add_allowed(MAC)
        reply = ok(await asyncio.to_thread(provision, port, MAC, {"mac": MAC}))

        assert uuid.UUID(reply["device_id"]) == listed.id
        assert await device_count(server) == 1
        assert (await server.registry.get(listed.id)).status is DeviceStatus.REGISTERED
        assert await asyncio.to_thread(login, port, reply) == ACCEPTED


async def test_approval_mode_answers_pending_until_an_operator_approves(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, mode="approval", pending_retry_after=7) as server:
        port = server.settings.broker.port
        session = await asyncio.to_thread(provisioning_session, port, MAC)
        try:
            for attempt in ("p1", "p2"):
                pending = await asyncio.to_thread(session.request, {"mac": MAC, "request_id": attempt})
                assert pending is not None
                assert pending.topic == TOPIC
                assert pending.json() == {"status": "pending", "retry_after": 7, "request_id": attempt}
            device = await server.registry.find_by_mac(MAC)
            assert device is not None
            assert device.status is DeviceStatus.PENDING
            assert not device.has_credentials
            assert await device_count(server) == 1

            await server.registry.approve(device.id)
            approved = ok(await asyncio.to_thread(session.request, {"mac": MAC}))
        finally:
            await asyncio.to_thread(session.close)

        assert uuid.UUID(approved["device_id"]) == device.id
        assert await asyncio.to_thread(login, port, approved) == ACCEPTED


async def test_a_rejected_device_is_not_allowed(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, mode="approval") as server:
        port = server.settings.broker.port
        session = await asyncio.to_thread(provisioning_session, port, MAC)
        try:
            pending = await asyncio.to_thread(session.request, {"mac": MAC})
            assert pending is not None
            assert pending.json()["status"] == "pending"
            device = await server.registry.find_by_mac(MAC)
            assert device is not None
            await server.registry.reject(device.id)

            refused = await asyncio.to_thread(session.request, {"mac": MAC})
        finally:
            await asyncio.to_thread(session.close)

        assert_error(refused, "NOT_ALLOWED", topic=TOPIC)
        assert (await server.registry.get(device.id)).status is DeviceStatus.REJECTED


# -- re-provisioning -----------------------------------------------------------------------------------


async def test_an_unused_registration_is_reissued_after_the_cooldown(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, reissue_cooldown=0) as server:
        port = server.settings.broker.port
        first = await enrol(server, MAC)
        second = await enrol(server, MAC)

        assert (second["device_id"], second["mqtt_username"]) == (first["device_id"], first["mqtt_username"])
        assert second["mqtt_password"] != first["mqtt_password"]
        assert await device_count(server) == 1
        assert await asyncio.to_thread(login, port, first) == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(login, port, second) == ACCEPTED


async def test_asking_again_within_the_cooldown_is_rate_limited(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, reissue_cooldown=60) as server:
        port = server.settings.broker.port
        first = await enrol(server, MAC)
        again = await asyncio.to_thread(provision, port, MAC, {"mac": MAC, "request_id": "again"})

        body = assert_error(again, "RATE_LIMITED", topic=TOPIC, retry_after=True)
        assert body["retry_after"] <= 60
        assert body["request_id"] == "again"
        assert await asyncio.to_thread(login, port, first) == ACCEPTED  # still the valid password


async def test_reprovision_reject_refuses_a_device_that_has_logged_in(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, reprovision="reject", reissue_cooldown=0) as server:
        port = server.settings.broker.port
        creds = await enrol(server, MAC)
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED

        refused = await asyncio.to_thread(provision, port, MAC, {"mac": MAC})

        assert_error(refused, "ALREADY_PROVISIONED", topic=TOPIC)
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED


async def test_reprovision_reissue_replaces_credentials_and_ends_the_live_session(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, reprovision="reissue", reissue_cooldown=0) as server:
        port = server.settings.broker.port
        old = await enrol(server, MAC)
        live = await asyncio.to_thread(device_session, port, old)
        try:
            assert await asyncio.to_thread(live.roundtrip, old["topic_prefix"] + "state", b"up")
            new = await enrol(server, MAC)
            assert await asyncio.to_thread(live.disconnected.wait, WAIT)
        finally:
            await asyncio.to_thread(live.close)

        assert (new["device_id"], new["mqtt_username"]) == (old["device_id"], old["mqtt_username"])
        assert new["mqtt_password"] != old["mqtt_password"]
        assert await asyncio.to_thread(login, port, old) == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(login, port, new) == ACCEPTED


async def test_reset_allows_one_new_enrolment(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, reprovision="reject", mac_burst=10) as server:
        port = server.settings.broker.port
        old = await enrol(server, MAC)
        assert await asyncio.to_thread(login, port, old) == ACCEPTED
        refused = await asyncio.to_thread(provision, port, MAC, {"mac": MAC})
        assert_error(refused, "ALREADY_PROVISIONED", topic=TOPIC)

        await server.registry.reset(uuid.UUID(old["device_id"]))
        assert await asyncio.to_thread(login, port, old) == BAD_USERNAME_OR_PASSWORD
        new = await enrol(server, MAC)

        assert new["device_id"] == old["device_id"]
        assert new["mqtt_password"] != old["mqtt_password"]
        assert await asyncio.to_thread(login, port, new) == ACCEPTED
        once_more = await asyncio.to_thread(provision, port, MAC, {"mac": MAC})
        assert_error(once_more, "ALREADY_PROVISIONED", topic=TOPIC)


async def test_a_decommissioned_device_is_refused_and_cannot_log_in(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, reissue_cooldown=0) as server:
        port = server.settings.broker.port
        creds = await enrol(server, MAC)
        await server.registry.decommission(uuid.UUID(creds["device_id"]))

        refused = await asyncio.to_thread(provision, port, MAC, {"mac": MAC, "request_id": "d"})

        body = assert_error(refused, "DECOMMISSIONED", topic=TOPIC)
        assert body["request_id"] == "d"
        assert await asyncio.to_thread(login, port, creds) in REFUSED
        assert await device_count(server) == 1


# -- rate limits ---------------------------------------------------------------------------------------


async def test_a_mac_that_asks_too_often_is_rate_limited(sqlite_url: str) -> None:
    options: dict[str, Any] = {"mode": "allowlist", "mac_burst": 2, "mac_requests_per_minute": 1}
    async with provisioning_broker(sqlite_url, **options) as server:
        port = server.settings.broker.port
        session = await asyncio.to_thread(provisioning_session, port, MAC)
        try:
            replies = [await asyncio.to_thread(session.request, {"mac": MAC}) for _ in range(3)]
        finally:
            await asyncio.to_thread(session.close)
        other = "02:00:00:00:10:02"
        unaffected = await asyncio.to_thread(provision, port, other, {"mac": other})

        assert_error(replies[0], "NOT_ALLOWED", topic=TOPIC)
        assert_error(replies[1], "NOT_ALLOWED", topic=TOPIC)
        limited = assert_error(replies[2], "RATE_LIMITED", topic=TOPIC, retry_after=True)
        assert 55 <= limited["retry_after"] <= 60  # one token a minute
        assert_error(unaffected, "NOT_ALLOWED", topic=REPLY_PREFIX + other)


async def test_an_address_that_asks_too_often_is_rate_limited(sqlite_url: str) -> None:
    options: dict[str, Any] = {"address_burst": 2, "address_requests_per_minute": 1}
    async with provisioning_broker(sqlite_url, **options) as server:
        port = server.settings.broker.port
        macs = [f"02:00:00:00:11:0{i}" for i in range(3)]
        replies = [await asyncio.to_thread(provision, port, mac, {"mac": mac}) for mac in macs]

        for reply in replies[:2]:
            assert reply is not None
            assert_ok(reply.json())
        limited = assert_error(replies[2], "RATE_LIMITED", topic=REPLY_PREFIX + macs[2], retry_after=True)
        assert 55 <= limited["retry_after"] <= 60
        assert await device_count(server) == 2


# -- proofs --------------------------------------------------------------------------------------------

FLEET_SECRET = "fleet-secret-for-tests-0123456789"
MASTER = "device-key-master-for-tests-0123456789"


async def test_fleet_secret_is_required_to_provision(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, auth="fleet_secret", fleet_secret=FLEET_SECRET) as server:
        port = server.settings.broker.port

        def code(client_id: str = MAC, **kw: Any) -> int:
            return connack_code(HOST, port, client_id, **kw)

        assert (
            await asyncio.to_thread(code, username="provision", password="wrong") == BAD_USERNAME_OR_PASSWORD
        )
        assert await asyncio.to_thread(code, username="provision") == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(code) == NOT_AUTHORIZED
        # Any other username is a service-account login, and no such account exists.
        assert await asyncio.to_thread(code, username="other", password=FLEET_SECRET) in REFUSED
        not_a_mac = await asyncio.to_thread(code, "sensor", username="provision", password=FLEET_SECRET)
        assert not_a_mac in REFUSED

        creds = await enrol(server, MAC, username="provision", password=FLEET_SECRET)
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED


async def test_guesses_at_the_fleet_secret_are_throttled_per_address(sqlite_url: str) -> None:
    settings = provisioning_settings(sqlite_url, auth="fleet_secret", fleet_secret=FLEET_SECRET)
    auth = settings.auth.model_copy(
        update={"throttle_after": 2, "lockout_after": 4, "max_refusal_delay": 0.05}
    )
    async with BrokerServer(settings.model_copy(update={"auth": auth})) as server:
        port = server.settings.broker.port

        def code(password: str) -> int:
            return connack_code(HOST, port, MAC, username="provision", password=password)

        creds = await enrol(server, "02:00:00:00:10:03", username="provision", password=FLEET_SECRET)
        guesses = [await asyncio.to_thread(code, f"guess-{n}") for n in range(4)]
        assert guesses == [BAD_USERNAME_OR_PASSWORD] * 4
        # Locked out: from this address even the right secret is refused without a comparison,
        # so a guess that happens to be right tells nothing, and the guessing stops paying.
        assert await asyncio.to_thread(code, FLEET_SECRET) == NOT_AUTHORIZED
        assert await asyncio.to_thread(code, "guess-5") == NOT_AUTHORIZED
        # A device's own login is not a proof: the fleet behind that address still logs in.
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED


async def test_device_key_is_derived_from_the_mac(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, auth="device_key", device_key_secret=MASTER) as server:
        port = server.settings.broker.port
        key = derive_device_key(MASTER, MAC)

        def code(client_id: str, password: str) -> int:
            return connack_code(HOST, port, client_id, username="provision", password=password)

        other_mac = derive_device_key(MASTER, "02:00:00:00:10:02")
        other_master = derive_device_key("another-master-secret", MAC)
        assert await asyncio.to_thread(code, MAC, other_mac) == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(code, MAC, other_master) == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(code, MAC, "") == BAD_USERNAME_OR_PASSWORD
        # The key belongs to the MAC, not to how the client id writes it.
        assert await asyncio.to_thread(code, "02-00-00-00-10-01-probe", key) == ACCEPTED

        creds = await enrol(server, MAC, username="provision", password=key)
        assert await asyncio.to_thread(login, port, creds) == ACCEPTED


@pytest.mark.parametrize("username", ["someone", "device", "admin"])
async def test_without_proof_a_mac_client_id_with_another_username_is_not_a_provisioning_session(
    sqlite_url: str, username: str
) -> None:
    async with provisioning_broker(sqlite_url, auth="none") as server:
        port = server.settings.broker.port
        refused = await asyncio.to_thread(connack_code, HOST, port, MAC, username=username, password="x")
        anonymous = await asyncio.to_thread(connack_code, HOST, port, MAC)
        provision_user = await asyncio.to_thread(connack_code, HOST, port, MAC, username="provision")

        assert refused in REFUSED
        assert (anonymous, provision_user) == (ACCEPTED, ACCEPTED)
