"""Provisioning traffic stays private: replies reach only the requesting session, provisioning
sessions touch nothing but ``provision/request``, and nothing under ``provision/`` is retained.

Every "was not received" check waits for a positive control first (a reply or a round trip that
IS delivered after the message in question), then looks at what arrived.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.auth_support import ACCOUNT_PASSWORD, make_account
from tests.mqtt_clients import (
    ACCEPTED,
    NOT_AUTHORIZED,
    REPLY_PREFIX,
    REQUEST_TOPIC,
    SUBACK_FAILURE,
    Client,
    assert_error,
    assert_ok,
    device_count,
    device_session,
    enrol,
    provision,
    provisioning_broker,
    provisioning_session,
)

VICTIM = "02:00:00:00:20:01"
ATTACKER = "02:00:00:00:20:02"


async def closing(*clients: Client) -> None:
    for client in clients:
        await asyncio.to_thread(client.close)


@pytest.mark.slow
@pytest.mark.parametrize(
    "topic_filter",
    [
        REPLY_PREFIX + VICTIM,
        REPLY_PREFIX + "020000002001",
        REPLY_PREFIX + "02-00-00-00-20-01",
        REPLY_PREFIX + "+",
        REPLY_PREFIX + "#",
        "provision/#",
        "provision/+/" + VICTIM,
        "+/reply/" + VICTIM,
        REQUEST_TOPIC,
        "#",
        "+/#",
        "devices/#",
    ],
)
async def test_another_session_can_neither_subscribe_to_nor_receive_a_victims_reply(
    sqlite_url: str, topic_filter: str
) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        attacker = await asyncio.to_thread(provisioning_session, port, ATTACKER)
        try:
            assert await asyncio.to_thread(attacker.subscribe, topic_filter) == SUBACK_FAILURE
            victim = await enrol(server, VICTIM)
            own = await asyncio.to_thread(attacker.request, {"mac": ATTACKER})  # the positive control
        finally:
            await closing(attacker)

        assert own is not None
        assert_ok(own.json())
        assert [m.topic for m in attacker.messages] == [REPLY_PREFIX + ATTACKER]
        assert all(victim["mqtt_password"].encode() not in m.payload for m in attacker.messages)


async def test_a_session_may_subscribe_its_own_reply_topic_in_any_notation(sqlite_url: str) -> None:
    notations = (ATTACKER, "020000002002", "0200.0000.2002", "02-00-00-00-20-02")
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        for n, written in enumerate(notations):  # each is accepted (provisioning_session asserts it)
            session = await asyncio.to_thread(
                provisioning_session, port, f"{ATTACKER}-{n}", REPLY_PREFIX + written
            )
            await closing(session)
        # One reply filter at a time: a session holding one is refused a second spelling of it.
        session = await asyncio.to_thread(
            provisioning_session, port, f"{ATTACKER}-x", REPLY_PREFIX + ATTACKER
        )
        try:
            second = await asyncio.to_thread(session.subscribe, REPLY_PREFIX + notations[1])
        finally:
            await closing(session)
        assert second == SUBACK_FAILURE


async def test_sessions_sharing_a_mac_get_only_their_own_replies(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        first = await asyncio.to_thread(provisioning_session, port, f"{VICTIM}-a", REPLY_PREFIX + VICTIM)
        second = await asyncio.to_thread(provisioning_session, port, f"{VICTIM}-b", REPLY_PREFIX + VICTIM)
        try:
            issued = await asyncio.to_thread(first.request, {"mac": VICTIM, "request_id": "a"})
            later = await asyncio.to_thread(second.request, {"mac": VICTIM, "request_id": "b"})
        finally:
            await closing(first, second)

        assert issued is not None
        creds = issued.json()
        assert_ok(creds, "a")
        assert_error(later, "RATE_LIMITED", topic=REPLY_PREFIX + VICTIM, retry_after=True)
        # Both are subscribed to the same reply topic; each got exactly its own reply.
        assert [m.json()["request_id"] for m in first.messages] == ["a"]
        assert [m.json()["request_id"] for m in second.messages] == ["b"]


async def test_a_device_never_sees_provisioning_traffic(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        creds = await enrol(server, VICTIM)
        device = await asyncio.to_thread(device_session, port, creds)
        try:
            refused = [
                await asyncio.to_thread(device.subscribe, topic_filter)
                for topic_filter in ("#", "provision/#", REQUEST_TOPIC, REPLY_PREFIX + "+", "+/+/+")
            ]
            stranger = await enrol(server, ATTACKER)  # a request and a reply pass through the broker
            sentinel = creds["topic_prefix"] + "sentinel"
            assert await asyncio.to_thread(device.roundtrip, sentinel, b"after")
        finally:
            await closing(device)

        assert refused == [SUBACK_FAILURE] * 5
        assert [m.topic for m in device.messages] == [sentinel]
        assert stranger["mqtt_password"].encode() not in device.messages[0].payload


async def test_a_device_cannot_publish_a_provisioning_request(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        creds = await enrol(server, VICTIM)
        device = await asyncio.to_thread(device_session, port, creds)
        try:
            for mac in (VICTIM, ATTACKER):
                await asyncio.to_thread(device.publish, REQUEST_TOPIC, {"mac": mac})
            sentinel = creds["topic_prefix"] + "sentinel"
            assert await asyncio.to_thread(device.roundtrip, sentinel, b"after")
        finally:
            await closing(device)

        assert [m.topic for m in device.messages] == [sentinel]
        assert await device_count(server) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "forged_topic",
    [
        "devices/{device_id}/commands",
        "devices/{device_id}",
        REPLY_PREFIX + VICTIM,
        REPLY_PREFIX + ATTACKER,
        "mqttprov/events/device/{device_id}",
    ],
)
async def test_a_provisioning_session_cannot_publish_anywhere_else(
    sqlite_url: str, forged_topic: str
) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        creds = await enrol(server, "02:00:00:00:20:03")
        topic = forged_topic.format(device_id=creds["device_id"])
        device = await asyncio.to_thread(device_session, port, creds)
        victim = await asyncio.to_thread(provisioning_session, port, VICTIM)
        attacker = await asyncio.to_thread(provisioning_session, port, ATTACKER)
        try:
            forged = {"status": "ok", "mqtt_username": "forged", "mqtt_password": "forged"}
            await asyncio.to_thread(attacker.publish, topic, forged)
            # The broker handles one session's packets in order: once this reply is here, the
            # forged publish has been dealt with (and would have been routed already).
            assert await asyncio.to_thread(attacker.request, {"mac": ATTACKER}) is not None
            genuine = await asyncio.to_thread(victim.request, {"mac": VICTIM})
            sentinel = creds["topic_prefix"] + "sentinel"
            assert await asyncio.to_thread(device.roundtrip, sentinel, b"after")
        finally:
            await closing(device, victim, attacker)

        assert [m.topic for m in device.messages] == [sentinel]
        assert genuine is not None
        assert [m.payload for m in victim.messages] == [genuine.payload]
        assert_ok(genuine.json())


@pytest.mark.parametrize("will_topic", [REQUEST_TOPIC, REPLY_PREFIX + VICTIM, "devices/x/status"])
async def test_a_provisioning_session_with_a_will_is_refused(sqlite_url: str, will_topic: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        client = Client(
            server.settings.broker.port, VICTIM, will=(will_topic, b'{"mac": "' + VICTIM.encode() + b'"}')
        )
        try:
            code = await asyncio.to_thread(client.connect)
        finally:
            await closing(client)

        assert code == NOT_AUTHORIZED
        assert await device_count(server) == 0


async def test_nothing_under_provision_is_retained(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        await make_account(server.accounts, "auditor", ["subscribe #"])
        session = await asyncio.to_thread(provisioning_session, port, VICTIM)
        try:
            await asyncio.to_thread(session.publish, REQUEST_TOPIC, {"mac": VICTIM}, retain=True)
            reply = await asyncio.to_thread(session.next_reply, 0)
        finally:
            await closing(session)
        assert reply is not None
        assert not reply.retain
        creds = reply.json()
        assert_ok(creds)

        # A retained message a device may leave in its own namespace: the positive control.
        device = await asyncio.to_thread(device_session, port, creds)
        try:
            await asyncio.to_thread(device.publish, creds["topic_prefix"] + "state", b"on", retain=True)
        finally:
            await closing(device)
        # Even an account allowed "subscribe #" gets the device's retained state and nothing else.
        auditor = Client(port, "auditor", username="auditor", password=ACCOUNT_PASSWORD)
        try:
            assert await asyncio.to_thread(auditor.connect) == ACCEPTED
            for topic_filter in ("provision/#", "#"):
                assert await asyncio.to_thread(auditor.subscribe, topic_filter) != SUBACK_FAILURE
            state = await asyncio.to_thread(auditor.wait_for, lambda m: m.topic.endswith("/state"))
        finally:
            await closing(auditor)

        assert state is not None
        assert state.retain
        assert state.payload == b"on"
        assert [m.topic for m in auditor.messages] == [creds["topic_prefix"] + "state"]
        assert not any(topic.startswith("provision/") for topic in server.broker._retained_messages)


async def test_a_devices_retained_message_stays_in_its_namespace(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        owner = await enrol(server, VICTIM)
        other = await enrol(server, ATTACKER)
        state_topic = owner["topic_prefix"] + "state"
        publisher = await asyncio.to_thread(device_session, port, owner)
        try:
            await asyncio.to_thread(publisher.publish, state_topic, b"secret-state", retain=True)
            # The owner still holds its subscription: amqtt would replay matching retained
            # messages on every CONNECT for every filter anyone holds.
            neighbour = await asyncio.to_thread(device_session, port, other, subscribe=False)
            try:
                refused = [
                    await asyncio.to_thread(neighbour.subscribe, topic_filter)
                    for topic_filter in ("#", "devices/#", "devices/+/state", owner["topic_prefix"] + "#")
                ]
                granted = await asyncio.to_thread(neighbour.subscribe, other["topic_prefix"] + "#")
                sentinel = other["topic_prefix"] + "sentinel"
                assert await asyncio.to_thread(neighbour.roundtrip, sentinel, b"after")
            finally:
                await closing(neighbour)
            again = await asyncio.to_thread(publisher.subscribe, owner["topic_prefix"] + "#")
            replayed = await asyncio.to_thread(publisher.wait_for, lambda m: m.retain)
        finally:
            await closing(publisher)

        assert refused == [SUBACK_FAILURE] * 4
        assert granted != SUBACK_FAILURE
        assert [m.topic for m in neighbour.messages] == [sentinel]
        assert again != SUBACK_FAILURE
        assert replayed is not None
        assert (replayed.topic, replayed.payload) == (state_topic, b"secret-state")


async def test_a_device_cannot_publish_into_another_devices_namespace(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        target_creds = await enrol(server, VICTIM)
        intruder_creds = await enrol(server, ATTACKER)
        target = await asyncio.to_thread(device_session, port, target_creds)
        intruder = await asyncio.to_thread(device_session, port, intruder_creds)
        try:
            await asyncio.to_thread(intruder.publish, target_creds["topic_prefix"] + "commands", b"open")
            assert await asyncio.to_thread(intruder.roundtrip, intruder_creds["topic_prefix"] + "s", b"1")
            sentinel = target_creds["topic_prefix"] + "sentinel"
            assert await asyncio.to_thread(target.roundtrip, sentinel, b"after")
        finally:
            await closing(target, intruder)

        assert [m.topic for m in target.messages] == [sentinel]


async def test_topic_prefix_follows_the_acl_device_template(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url, acl={"device_template": "fleet/acme/{username}/#"}) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, VICTIM, {"mac": VICTIM})
        assert reply is not None
        creds = reply.json()
        assert creds["status"] == "ok"
        device = await asyncio.to_thread(device_session, port, creds)
        try:
            delivered = await asyncio.to_thread(device.roundtrip, creds["topic_prefix"] + "state", b"on")
        finally:
            await closing(device)

        assert creds["topic_prefix"] == f"fleet/acme/{creds['mqtt_username']}/"
        assert delivered
