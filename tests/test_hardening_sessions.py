"""A session belongs to the principal that created it; revocation leaves nothing to resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import provisioning.registry.accounts
from broker.embedded import BrokerServer
from provisioning.registry.accounts import AccountError, validate_account_name
from tests.auth_support import (
    ACCOUNT_PASSWORD,
    PASSWORD,
    eventually,
    hashed,
    make_account,
    make_device,
    polled,
    settings,
)
from tests.test_hardening_subscriptions import Wire

RULES = ["subscribe devices/#", "publish devices/#"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    config = settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", revocation_poll_interval=0.1)
    async with BrokerServer(config) as running:
        await make_account(running.accounts, "svc", RULES)
        await make_account(running.accounts, "feeder", RULES)
        yield running


@pytest.mark.parametrize("name", ["ab", "AB", "0a", "aabbccddeeff", "AABB.CCDD.EEFF"])
def test_account_names_that_read_as_a_mac_are_refused(name: str) -> None:
    with pytest.raises(AccountError):
        validate_account_name(name)


@pytest.mark.parametrize("name", ["abc", "a", "svc", "ab_c", "aabbccddeeff0"])
def test_other_account_names_are_kept(name: str) -> None:
    assert validate_account_name(name) == name


async def test_an_old_account_named_like_a_mac_cannot_use_that_macs_client_id(
    server: BrokerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An account made before such names were refused.
    monkeypatch.setattr(provisioning.registry.accounts, "validate_account_name", lambda name: name)
    await server.accounts.add("ab", hashed(ACCOUNT_PASSWORD), [])
    port = server.settings.broker.port

    def logins() -> list[int]:
        codes = []
        for client_id in ("ab-cd-ef-01-23-45", "ab-cd-ef-01-23-45-x", "ab-1"):
            wire = Wire(port, client_id, username="ab", password=ACCOUNT_PASSWORD, clean_session=False)
            codes.append(wire.code)
            wire.close()
        return codes

    assert await asyncio.to_thread(logins) == [5, 5, 0]


#: What :func:`leave_with_a_queued_message` queues.
QUEUED = b"queued under the old credential"


def leave_with_a_queued_message(
    port: int, client_id: str, topic: str, *, feeder: str = "feeder", **login: object
) -> None:
    """A persistent session subscribed to ``topic``, offline, with one QoS 1 message queued
    (published by the account ``feeder``, whose password is ``ACCOUNT_PASSWORD``)."""
    wire = Wire(port, client_id, clean_session=False, **login)
    assert wire.code == 0
    assert wire.subscribe([topic]) == [1]
    wire.disconnect()
    publisher = Wire(port, f"{feeder}-queues", username=feeder, password=ACCOUNT_PASSWORD)
    publisher.publish(topic, QUEUED)
    publisher.disconnect()


def resume(port: int, client_id: str, **login: object) -> tuple[int, int, list[tuple[str, bytes]]]:
    """Connect again with clean session 0: CONNACK code, session present, what arrived."""
    wire = Wire(port, client_id, clean_session=False, **login)
    try:
        if wire.code == 0:
            wire.ping()
        return wire.code, wire.session_present, wire.published
    finally:
        wire.disconnect()


@pytest.mark.parametrize("change", ["remove", "rotate"])
async def test_an_accounts_removal_or_rotation_discards_its_offline_sessions(
    server: BrokerServer, change: str
) -> None:
    port = server.settings.broker.port
    login = {"username": "svc", "password": ACCOUNT_PASSWORD}
    await asyncio.to_thread(leave_with_a_queued_message, port, "svc-p", "devices/q", **login)
    assert "svc-p" in server.broker.sessions
    if change == "remove":
        await server.accounts.remove("svc")
        await make_account(server.accounts, "svc", RULES)
    else:
        await server.accounts.rotate("svc", hashed(ACCOUNT_PASSWORD))
    gone = await eventually(polled(lambda: "svc-p" not in server.broker.sessions), bool)
    assert gone
    code, present, received = await asyncio.to_thread(resume, port, "svc-p", **login)
    assert (code, present, received) == (0, 0, [])


async def test_the_same_credential_resumes_its_session(server: BrokerServer) -> None:
    port = server.settings.broker.port
    login = {"username": "svc", "password": ACCOUNT_PASSWORD}
    await asyncio.to_thread(leave_with_a_queued_message, port, "svc-p", "devices/q", **login)
    code, present, received = await asyncio.to_thread(resume, port, "svc-p", **login)
    assert (code, present, received) == (0, 1, [("devices/q", QUEUED)])


async def test_a_recreated_account_never_resumes_the_old_session(server: BrokerServer) -> None:
    # Decided at CONNECT, whether or not the change feed was applied yet: the credential differs.
    port = server.settings.broker.port
    login = {"username": "svc", "password": ACCOUNT_PASSWORD}
    await asyncio.to_thread(leave_with_a_queued_message, port, "svc-p", "devices/q", **login)
    session = server.broker.sessions["svc-p"][0]
    server.services.revoker.request_stop()  # the follower must not get there first
    await server.accounts.remove("svc")
    await make_account(server.accounts, "svc", ["subscribe devices/other/#"])
    code, present, received = await asyncio.to_thread(resume, port, "svc-p", **login)
    assert (code, present, received) == (0, 0, [])
    assert server.broker.sessions.get("svc-p", (None,))[0] is not session


@pytest.mark.parametrize("change", ["decommission", "reset", "delete"])
async def test_a_revoked_devices_offline_session_is_discarded(server: BrokerServer, change: str) -> None:
    port = server.settings.broker.port
    device = await make_device(server.registry, "02:00:00:00:5e:01")
    user = device.mqtt_username
    topic = f"devices/{device.id}/commands"
    await asyncio.to_thread(leave_with_a_queued_message, port, user, topic, username=user, password=PASSWORD)
    assert user in server.broker.sessions
    await getattr(server.registry, change)(device.id)
    assert await eventually(polled(lambda: user not in server.broker.sessions), bool)


async def test_an_offline_session_expires_and_a_connected_one_does_not(tmp_path: Path) -> None:
    base = settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    broker = base.broker.model_copy(update={"session_expiry": 0.5})
    async with BrokerServer(base.model_copy(update={"broker": broker})) as running:
        await make_account(running.accounts, "svc", RULES)
        await make_account(running.accounts, "feeder", RULES)
        port = running.settings.broker.port
        login = {"username": "svc", "password": ACCOUNT_PASSWORD}
        staying = await asyncio.to_thread(Wire, port, "svc-live", clean_session=False, **login)
        try:
            assert staying.code == 0
            await asyncio.to_thread(leave_with_a_queued_message, port, "svc-p", "devices/q", **login)
            assert "svc-p" in running.broker.sessions
            gone = await eventually(polled(lambda: "svc-p" not in running.broker.sessions), bool)
            assert gone
            assert running.broker.sessions_expired == 1
            # Connected all along (longer than the expiry): kept, and still served.
            await asyncio.to_thread(staying.ping)
            assert "svc-live" in running.broker.sessions
        finally:
            await asyncio.to_thread(staying.disconnect)
        code, present, received = await asyncio.to_thread(resume, port, "svc-p", **login)
        assert (code, present, received) == (0, 0, [])
