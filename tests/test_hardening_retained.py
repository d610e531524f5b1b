"""Retained messages published under a credential that is no longer current are cleared.

A decommissioned device has no session for the revocation follower to end, but its retained state
reached every new subscriber its ACL allowed. The broker records who retained each message; the
follower clears those of a credential that changed (reissue, reset, decommission, delete, account
rotate and remove). Real broker on a free port, raw sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.embedded import BrokerServer
from provisioning.registry import DeviceInfo, DeviceStatus
from tests import auth_support as support
from tests.auth_support import ACCOUNT_PASSWORD, PASSWORD
from tests.test_hardening_subscriptions import Wire

READER = {"username": "reader", "password": ACCOUNT_PASSWORD}
FEEDER = {"username": "feeder", "password": ACCOUNT_PASSWORD}
#: Retained by an account nobody revokes: it must still be there afterwards.
BYSTANDER = ("devices/bystander/state", b"still here")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    config = support.settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", revocation_poll_interval=0.1)
    async with BrokerServer(config) as running:
        await support.make_account(running.accounts, "reader", ["subscribe devices/+/state"])
        await support.make_account(running.accounts, "feeder", ["publish devices/#"])
        await _retain(running, "feeder", *BYSTANDER, **FEEDER)
        yield running


async def _retain(server: BrokerServer, client_id: str, topic: str, payload: bytes, /, **login: str) -> None:
    def publish() -> None:
        wire = Wire(server.settings.broker.port, client_id, **login)
        assert wire.code == 0
        wire.publish(topic, payload, retain=True)
        wire.disconnect()

    await asyncio.to_thread(publish)
    # PUBACK precedes the broker's handling of the message: wait for it to be retained.
    assert await _retained(server, topic)


async def _new_subscriber_receives(server: BrokerServer) -> list[tuple[str, bytes]]:
    """What a reader subscribing ``devices/+/state`` now gets (retained messages only)."""

    def subscribe() -> list[tuple[str, bytes]]:
        wire = Wire(server.settings.broker.port, "reader", **READER)
        try:
            assert wire.subscribe(["devices/+/state"]) == [1]
            wire.ping()  # every retained message sent for the SUBSCRIBE is here by then
            return sorted(wire.published)
        finally:
            wire.disconnect()

    return await asyncio.to_thread(subscribe)


async def _cleared(server: BrokerServer, topic: str) -> bool:
    return await _retained(server, topic, held=False)


async def _retained(server: BrokerServer, topic: str, *, held: bool = True) -> bool:
    """Whether ``topic`` came to retain a message (or to retain none, ``held=False``) in time."""
    store = server.broker.retained_messages
    return await support.eventually(support.polled(lambda: (topic in store) == held), bool)


async def _device_with_retained_state(server: BrokerServer, mac: str) -> tuple[DeviceInfo, str]:
    device = await support.make_device(server.registry, mac)
    topic = f"devices/{device.id}/state"
    login = {"username": device.mqtt_username, "password": PASSWORD}
    await _retain(server, device.mqtt_username, topic, b"last state", **login)
    assert sorted(await _new_subscriber_receives(server)) == sorted([BYSTANDER, (topic, b"last state")])
    return device, topic


@pytest.mark.slow
@pytest.mark.parametrize("change", ["decommission", "delete", "reset", "reissue"])
async def test_a_revoked_devices_retained_messages_are_cleared(server: BrokerServer, change: str) -> None:
    # The device is offline: nothing but its retained message is left for the follower to find.
    device, topic = await _device_with_retained_state(server, "02:00:00:00:5c:01")
    assert device.mqtt_username not in dict(server.broker.held_principals())
    if change == "reissue":
        await server.registry.issue_credentials(
            device.id,
            support.hashed(PASSWORD),
            expected_hash=await support.stored_hash(server, device),
            allowed_from={DeviceStatus.REGISTERED},
        )
    else:
        await getattr(server.registry, change)(device.id)
    assert await _cleared(server, topic)
    assert await _new_subscriber_receives(server) == [BYSTANDER]


async def test_a_retained_will_of_a_decommissioned_device_is_cleared(server: BrokerServer) -> None:
    device = await support.make_device(server.registry, "02:00:00:00:5c:02")
    topic = f"devices/{device.id}/state"

    def die_with_a_retained_will() -> None:
        wire = Wire(
            server.settings.broker.port,
            device.mqtt_username,
            username=device.mqtt_username,
            password=PASSWORD,
            will=(topic, b"gone"),
            will_retain=True,
        )
        assert wire.code == 0
        wire.ping()
        wire.close()  # no DISCONNECT: the will is published and retained

    await asyncio.to_thread(die_with_a_retained_will)
    assert await _retained(server, topic)
    await server.registry.decommission(device.id)
    assert await _cleared(server, topic)
    assert await _new_subscriber_receives(server) == [BYSTANDER]


@pytest.mark.parametrize("change", ["remove", "rotate"])
async def test_an_accounts_retained_messages_go_with_its_credential(
    server: BrokerServer, change: str
) -> None:
    topic = "devices/feeder/state"
    await _retain(server, "feeder-1", topic, b"under the old credential", **FEEDER)
    if change == "remove":
        await server.accounts.remove("feeder")
    else:
        await server.accounts.rotate("feeder", support.hashed(ACCOUNT_PASSWORD))
    assert await _cleared(server, topic)
    assert BYSTANDER[0] not in server.broker.retained_messages  # the account's other message too
    assert await _new_subscriber_receives(server) == []


async def test_what_the_current_credential_retains_is_kept(server: BrokerServer) -> None:
    await server.accounts.rotate("feeder", support.hashed(ACCOUNT_PASSWORD))
    assert await _cleared(server, BYSTANDER[0])
    await _retain(server, "feeder", *BYSTANDER, **FEEDER)
    await server.services.revoker.apply({"feeder"})  # the same change seen again: nothing to clear
    assert await _new_subscriber_receives(server) == [BYSTANDER]


async def test_retained_messages_do_not_survive_a_restart(tmp_path: Path) -> None:
    # Nothing to clear after a restart: amqtt 0.12.1 keeps retained messages in memory only. If
    # that ever changes, who published them must be kept with them, or a revoked one comes back.
    config = support.settings(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    async with BrokerServer(config) as first:
        await support.make_account(first.accounts, "reader", ["subscribe devices/+/state"])
        await support.make_account(first.accounts, "feeder", ["publish devices/#"])
        await _retain(first, "feeder", *BYSTANDER, **FEEDER)
    async with BrokerServer(config) as second:
        assert not second.broker.retained_messages
        assert await _new_subscriber_receives(second) == []
