"""Races: many sessions asking for one MAC, hundreds of MACs at once, credential changes racing logins.

Whatever the interleaving, the registry ends consistent with the replies: one device per MAC,
at most one working password per device, and no session living on a credential that is gone.
Clients run in worker threads (the broker runs on the test's event loop).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from amqtt.broker import Broker

from broker.embedded import BrokerServer
from config import Settings
from provisioning.registry import DeviceStatus
from tests.auth_support import PASSWORD, login_code, make_device
from tests.mqtt_clients import (
    ACCEPTED,
    BAD_USERNAME_OR_PASSWORD,
    REPLY_PREFIX,
    REQUEST_TOPIC,
    WAIT,
    Client,
    assert_ok,
    device_count,
    login,
    provisioning_broker,
    provisioning_session,
    provisioning_settings,
    request_provisioning,
)

#: How soon a revoked credential's sessions must be gone (the README's promise).
REVOCATION_DEADLINE = 2.0
SESSIONS_PER_MAC = 50
DISTINCT_MACS = 500
CLIENT_THREADS = 24
LOGIN_RACERS = 16


def in_threads(work: Callable[[Any], Any], items: list[Any], threads: int = CLIENT_THREADS) -> list[Any]:
    """``work`` over ``items`` from a pool of client threads, results in order."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="race-client") as pool:
        return list(pool.map(work, items))


def one_mac_from_many_sessions(port: int, mac: str, sessions: int) -> list[dict[str, Any]]:
    """``sessions`` sessions (suffixed client ids) publish one request each, all before any reply."""
    clients: list[Client] = []
    try:
        clients.extend(provisioning_session(port, f"{mac}-{i}", REPLY_PREFIX + mac) for i in range(sessions))
        for client in clients:
            client.publish(REQUEST_TOPIC, {"mac": mac, "request_id": client.client_id}, wait=False)
        replies = [client.next_reply(0) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert all(reply is not None for reply in replies), "a session got no reply"
    return [reply.json() for reply in replies if reply is not None]


@pytest.mark.slow
async def test_fifty_sessions_for_one_mac_leave_one_device_and_one_working_password(
    database_url: str,
) -> None:
    # Without the cool-down (with it, see test_provisioning.py: exactly one ``ok``), requests
    # arriving after the first commit are reissues: several ``ok`` replies, of which only the
    # one committed last may still log in.
    mac = "02:00:00:00:0a:01"
    base = provisioning_settings(database_url, mac_burst=100, reissue_cooldown=0)
    # Every stale password is a failed login from 127.0.0.1: no throttling or lockout here.
    unthrottled = base.auth.model_dump() | {"throttle_after": 1000, "lockout_after": 1000}
    async with BrokerServer(Settings.model_validate(base.model_dump() | {"auth": unthrottled})) as server:
        port = server.settings.broker.port
        bodies = await asyncio.to_thread(one_mac_from_many_sessions, port, mac, SESSIONS_PER_MAC)

        assert len(bodies) == SESSIONS_PER_MAC
        oks = [b for b in bodies if b["status"] == "ok"]
        refusals = [b for b in bodies if b["status"] != "ok"]
        assert {(b["status"], b["error_code"]) for b in refusals} <= {("error", "RATE_LIMITED")}
        assert len(oks) >= 1
        assert len({assert_ok(b, b["request_id"]) for b in oks}) == 1  # one device id
        assert len({b["mqtt_username"] for b in oks}) == 1
        assert await device_count(server) == 1

        codes = [await asyncio.to_thread(login, port, b) for b in oks]
        assert codes.count(ACCEPTED) == 1, codes
        assert set(codes) <= {ACCEPTED, BAD_USERNAME_OR_PASSWORD}
        record = await server.registry.find_credentials_by_mac(mac)
        assert record is not None
        assert record.device.activated_at is not None


@pytest.mark.slow
async def test_five_hundred_macs_at_once_make_five_hundred_devices_that_log_in(sqlite_url: str) -> None:
    # SQLite only, to keep this file near a minute: the races around it (concurrent enrolment
    # of one MAC, credential changes racing logins) run on PostgreSQL too.
    macs = [f"02:00:00:0b:{n >> 8:02x}:{n & 0xFF:02x}" for n in range(DISTINCT_MACS)]
    # All clients come from 127.0.0.1: the per-address limit is for one misbehaving host.
    options: dict[str, Any] = {"address_burst": 2 * DISTINCT_MACS, "address_requests_per_minute": 100_000}
    async with provisioning_broker(sqlite_url, **options) as server:
        port = server.settings.broker.port

        def enrol(mac: str) -> dict[str, Any] | None:
            return request_provisioning(port, mac, {"mac": mac}, timeout=30)

        bodies = await asyncio.to_thread(in_threads, enrol, macs)
        assert all(b is not None for b in bodies), "a MAC got no reply"
        oks = [b for b in bodies if b is not None and b["status"] == "ok"]
        assert len(oks) == DISTINCT_MACS, [b for b in bodies if b is not None and b["status"] != "ok"][:3]
        assert len({assert_ok(b) for b in oks}) == DISTINCT_MACS
        assert await device_count(server) == DISTINCT_MACS

        def log_in(body: dict[str, Any]) -> int:
            user = body["mqtt_username"]
            return login_code(port, user, username=user, password=body["mqtt_password"], timeout=WAIT * 3)

        codes = await asyncio.to_thread(in_threads, log_in, oks)
        assert codes == [ACCEPTED] * DISTINCT_MACS


# -- credential changes racing logins ----------------------------------------------------------------


def racing_logins(port: int, username: str, password: str, count: int) -> list[Client]:
    """``count`` logins of one device at once; returns the clients (connected or refused)."""
    clients = [Client(port, username, username=username, password=password) for _ in range(count)]

    def attempt(client: Client) -> Client:
        client.connect()
        return client

    return in_threads(attempt, clients, threads=count)


async def settled(server: BrokerServer, username: str, clients: list[Client]) -> list[int | None]:
    """Wait until no session of ``username`` is live (or the deadline passes); the CONNACK codes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REVOCATION_DEADLINE + 1.0
    while loop.time() < deadline and any(
        getattr(p, "username", None) == username for _, p in server.broker.live_principals()
    ):
        await asyncio.sleep(0.05)  # polling the session table against the deadline above
    return [client.connack for client in clients]


@pytest.mark.slow
async def test_concurrent_logins_with_one_client_id_leave_exactly_one_connection(database_url: str) -> None:
    # Regression: CONNECTs waiting together on one take-over each deleted the table entry the
    # one before had just made, leaving connections open, "connected", and beyond any kick.
    async with provisioning_broker(database_url) as server:
        port = server.settings.broker.port
        device = await make_device(server.registry, "02:00:00:00:0c:03")
        user = device.mqtt_username
        clients = await asyncio.to_thread(racing_logins, port, user, PASSWORD, LOGIN_RACERS)
        try:
            assert [c.connack for c in clients] == [ACCEPTED] * LOGIN_RACERS
            live = [cid for cid, p in server.broker.live_principals() if getattr(p, "username", None) == user]
            # Every client but the one in the table is told its connection was taken over.
            open_ = await asyncio.to_thread(lambda: [c for c in clients if not c.disconnected.wait(WAIT / 4)])
        finally:
            for client in clients:
                await asyncio.to_thread(client.close)
        assert live == [user]
        assert len(open_) == 1
        assert len(server.broker.turns) == 0  # no lock left behind per client id


def test_the_amqtt_method_that_ends_a_turn_is_still_there() -> None:
    # broker.embedded.turns hands the turn on when amqtt 0.12.1 enters a connection's message loop.
    source = inspect.getsource(Broker._handle_client_session)
    assert "await self._client_message_loop(client_session, handler)" in source
    assert list(inspect.signature(Broker._client_message_loop).parameters) == [
        "self",
        "client_session",
        "handler",
    ]


@pytest.mark.slow
async def test_a_decommission_racing_logins_leaves_no_live_session_and_no_working_password(
    database_url: str,
) -> None:
    # Once decommissioned, the racers' logins are failures from one address: more checks in flight
    # at once than lockout_after (a slow machine) would answer 3 ("try again") by design. The
    # lockout is not what this test is about.
    base = provisioning_settings(database_url)
    unlocked = base.auth.model_dump() | {"lockout_after": 10 * LOGIN_RACERS}
    async with BrokerServer(Settings.model_validate(base.model_dump() | {"auth": unlocked})) as server:
        port = server.settings.broker.port
        device = await make_device(server.registry, "02:00:00:00:0c:01")
        user = device.mqtt_username
        logins = asyncio.create_task(
            asyncio.to_thread(racing_logins, port, user, PASSWORD, LOGIN_RACERS), name="logins"
        )
        retired = await server.registry.decommission(device.id)
        clients = await logins
        try:
            codes = await settled(server, user, clients)
            live = [cid for cid, p in server.broker.live_principals() if getattr(p, "username", None) == user]
            connected = [c for c in clients if c.connack == ACCEPTED]
            # Every session that got in was thrown off: the device hears about it.
            for client in connected:
                assert await asyncio.to_thread(client.disconnected.wait, WAIT)
        finally:
            for client in clients:
                await asyncio.to_thread(client.close)

        assert retired.status is DeviceStatus.DECOMMISSIONED
        assert live == []
        assert set(codes) <= {ACCEPTED, BAD_USERNAME_OR_PASSWORD}, codes
        assert await asyncio.to_thread(_login, port, user, PASSWORD) == BAD_USERNAME_OR_PASSWORD
        found = await server.registry.get(device.id)
        assert found.status is DeviceStatus.DECOMMISSIONED  # no presence write undid it


@pytest.mark.slow
async def test_a_reissue_racing_logins_leaves_only_the_new_password_working(database_url: str) -> None:
    mac = "02:00:00:00:0c:02"
    async with provisioning_broker(database_url, reprovision="reissue", reissue_cooldown=0) as server:
        port = server.settings.broker.port
        device = await make_device(server.registry, mac)
        user = device.mqtt_username
        logins = asyncio.create_task(
            asyncio.to_thread(racing_logins, port, user, PASSWORD, LOGIN_RACERS), name="logins"
        )
        body = await asyncio.to_thread(ask_until_issued, port, mac)
        clients = await logins
        try:
            await settled(server, user, clients)
            stale = [
                cid
                for cid, p in server.broker.live_principals()
                if getattr(p, "username", None) == user and getattr(p, "tag", None) != await _tag(server, mac)
            ]
            for client in clients:
                if client.connack == ACCEPTED:
                    assert await asyncio.to_thread(client.disconnected.wait, WAIT)
        finally:
            for client in clients:
                await asyncio.to_thread(client.close)

        assert body is not None
        assert assert_ok(body) == device.id
        assert stale == []
        assert await asyncio.to_thread(_login, port, user, PASSWORD) == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(login, port, body) == ACCEPTED


def ask_until_issued(port: int, mac: str, attempts: int = 5) -> dict[str, Any] | None:
    """Ask for credentials; a login flipping the status mid-issue is RATE_LIMITED, so ask again."""
    body = None
    for _ in range(attempts):
        body = request_provisioning(port, mac, {"mac": mac})
        if body is None or body.get("error_code") != "RATE_LIMITED":
            return body
    return body


async def _tag(server: BrokerServer, mac: str) -> str:
    from auth_plugin.principals import credential_tag  # noqa: PLC0415 - only the reissue race needs it

    record = await server.registry.find_credentials_by_mac(mac)
    assert record is not None
    assert record.password_hash is not None
    return credential_tag(record.password_hash)


def _login(port: int, username: str, password: str) -> int:
    # From another address: the racers' refusals may have locked the pair out from 127.0.0.1.
    return login_code(port, username, username=username, password=password, source="127.0.0.2")
