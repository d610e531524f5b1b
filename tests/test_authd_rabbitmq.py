"""authd as the HTTP auth backend of a real two-node RabbitMQ 3.10 cluster (tests/rabbitmq_cluster.py).

One cluster and one ``mqttprov authd`` process serve the whole module (a node takes ~10 s to
start). Devices are provisioned by the embedded provisioning service on the module's registry;
MQTT clients are paho-mqtt or raw sockets, called from threads.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from provisioning.contract import OkReply, identity_from_client_id
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.service import Outcome, ProvisioningService
from tests.auth_support import ACCOUNT_PASSWORD, RawSession, hashed, make_account
from tests.authd_support import SECRET, authd_process, write_authd_config
from tests.helpers import broker_settings, free_port, run_mqttprov
from tests.mqtt_clients import Client, assert_ok, provisioning_session
from tests.rabbitmq_cluster import KICK_EXPRESSION, Cluster, Node, rabbitmq_cluster, rabbitmq_missing

pytestmark = pytest.mark.skipif(rabbitmq_missing() is not None, reason=rabbitmq_missing() or "")

ACCEPTED = 0
#: RabbitMQ 3.10 answers every refused MQTT login with CONNACK 4 (bad username or password).
REFUSED = 4
#: How long the kick of a live connection may take: the change feed (0.5 s poll on SQLite) plus
#: one ``rabbitmqctl eval`` (an Erlang VM start: ~2 s measured here on two cores).
KICK_DEADLINE = 10.0


@dataclass
class Deployment:
    """The cluster, the authd in front of the registry, and the registry's URL."""

    cluster: Cluster
    database_url: str
    authd_url: str
    config: Path

    @property
    def node_a(self) -> Node:
        return self.cluster.nodes[0]

    @property
    def node_b(self) -> Node:
        return self.cluster.nodes[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("rabbitmq")
    database_url = f"sqlite+aiosqlite:///{base / 'registry.db'}"
    port = free_port()
    # The secret as the password of the URL's user info: RabbitMQ sends it as HTTP basic auth.
    cluster = Cluster(base / "cluster", f"http://rabbitmq:{SECRET}@127.0.0.1:{port}")
    # Kicks run on node a: the devices these tests kick are connected to node b.
    kick = [str(cluster.ctl_script), "-n", cluster.nodes[0].name, "eval", KICK_EXPRESSION]
    config = write_authd_config(
        base / "mqttprov.toml", database_url, port, contracts=["rabbitmq"], kick_command=kick
    )
    done = run_mqttprov("db", "upgrade", "--config", str(config), cwd=base)
    assert done.returncode == 0, done.stderr
    with authd_process(config, port, base) as url:
        (base / "cluster").mkdir()
        with rabbitmq_cluster(cluster):
            yield Deployment(cluster, database_url, url, config)


@pytest.fixture
async def registry(deployment: Deployment) -> AsyncIterator[DeviceRegistry]:
    reg = DeviceRegistry(create_engine(deployment.database_url))
    try:
        yield reg
    finally:
        await reg.close()


async def handled(registry: DeviceRegistry, settings: Settings, mac: str, payload: bytes) -> Outcome:
    """One request through the embedded provisioning service (what a provisioning worker runs)."""
    hasher = PasswordHasher(4, workers=1)
    try:
        identity = identity_from_client_id(mac)
        assert identity is not None
        return await ProvisioningService(registry, hasher, settings).handle(identity, payload, None)
    finally:
        hasher.close()


async def provisioned(registry: DeviceRegistry, settings: Settings, mac: str) -> dict[str, Any]:
    """Enrol ``mac`` through the embedded provisioning service; the credentials of its reply."""
    outcome = await handled(registry, settings, mac, json.dumps({"mac": mac}).encode())
    assert isinstance(outcome.reply, OkReply), outcome.reply
    return outcome.reply.model_dump(mode="json")


def connect(node: Node, client_id: str, username: str | None = None, password: str | None = None) -> Client:
    """A paho session on ``node`` that must be accepted."""
    client = Client(node.mqtt_port, client_id, username=username, password=password)
    code = client.connect()
    if code != ACCEPTED:
        client.close()
        raise AssertionError(f"{client_id!r} refused by {node.name} with CONNACK {code}")
    return client


def login(node: Node, creds: dict[str, Any], **override: str) -> int:
    """One CONNECT with these credentials on a raw socket; the CONNACK code."""
    fields = {
        "client_id": creds["mqtt_client_id"],
        "username": creds["mqtt_username"],
        "password": creds["mqtt_password"],
    } | override
    with RawSession(node.mqtt_port) as session:
        return session.connect(fields.pop("client_id"), **fields)


def _packet(kind: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([kind, len(body)]) + body


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def refused(node: Node, client_id: str, action: str, topic: str, **credentials: str | None) -> bool:
    """Log in, SUBSCRIBE (QoS 1) or PUBLISH (QoS 1) once: True when RabbitMQ refuses it.

    RabbitMQ 3.10 refuses both by closing the connection (no SUBACK 0x80, no PUBACK).
    """
    with RawSession(node.mqtt_port) as session:
        assert session.connect(client_id, **credentials) == ACCEPTED
        if action == "subscribe":
            session.sock.sendall(_packet(0x82, struct.pack("!H", 1) + _text(topic) + b"\x01"))
            expected = b"\x90"
        else:
            session.sock.sendall(_packet(0x32, _text(topic) + struct.pack("!H", 1) + b"{}"))
            expected = b"\x40"
        session.sock.settimeout(10)
        try:
            first = session.sock.recv(1)
        except ConnectionResetError:
            return True
        if first == b"":
            return True
        assert first == expected, f"unexpected packet {first!r}"
        if action == "subscribe":
            rest = session.sock.recv(4)
            return rest[-1:] == b"\x80"
        return False


def device_creds(creds: dict[str, Any]) -> dict[str, str]:
    """Keyword arguments of :func:`refused` for a device."""
    return {"username": creds["mqtt_username"], "password": creds["mqtt_password"]}


async def test_a_provisioned_device_logs_in_on_both_nodes(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    creds = await provisioned(registry, broker_settings(deployment.database_url), "02:00:00:00:0a:01")
    for node in deployment.cluster.nodes:
        assert await asyncio.to_thread(login, node, creds) == ACCEPTED
        assert await asyncio.to_thread(login, node, creds, password="wrong-password") == REFUSED
        assert await asyncio.to_thread(login, node, creds, client_id="another-client-id") == REFUSED


async def test_a_device_provisions_through_node_b_and_logs_in_on_node_a(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    # A provisioning worker as part 3 of the design runs it: a service account on node a that
    # reads provision/request and publishes the service's reply to provision/reply/<mac>.
    rules = ["subscribe provision/request", "publish provision/reply/+"]
    await make_account(AccountRegistry(registry.engine), "worker", rules)
    mac = "02:00:00:00:0a:08"
    worker = await asyncio.to_thread(connect, deployment.node_a, "worker-1", "worker", ACCOUNT_PASSWORD)
    try:
        assert await asyncio.to_thread(worker.subscribe, "provision/request") == 1
        # The firmware's own session: anonymous, client id = MAC, its reply topic only.
        device = await asyncio.to_thread(provisioning_session, deployment.node_b.mqtt_port, mac)
        try:
            await asyncio.to_thread(device.publish, "provision/request", {"mac": mac})
            request = await asyncio.to_thread(worker.wait_for, lambda m: m.topic == "provision/request")
            assert request is not None
            outcome = await handled(registry, broker_settings(deployment.database_url), mac, request.payload)
            await asyncio.to_thread(worker.publish, outcome.topic, outcome.reply.to_payload())
            reply = await asyncio.to_thread(device.next_reply, 0)
        finally:
            await asyncio.to_thread(device.close)
    finally:
        await asyncio.to_thread(worker.close)
    assert reply is not None
    assert reply.topic == f"provision/reply/{mac}"
    creds = reply.json()
    assert_ok(creds)
    assert await asyncio.to_thread(login, deployment.node_a, creds) == ACCEPTED


async def test_telemetry_from_node_a_reaches_a_service_account_on_node_b(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    creds = await provisioned(registry, broker_settings(deployment.database_url), "02:00:00:00:0a:02")
    await make_account(AccountRegistry(registry.engine), "reader", ["subscribe devices/+/telemetry"])
    reader = await asyncio.to_thread(connect, deployment.node_b, "reader-1", "reader", ACCOUNT_PASSWORD)
    try:
        assert await asyncio.to_thread(reader.subscribe, "devices/+/telemetry") == 1
        device = await asyncio.to_thread(
            connect,
            deployment.node_a,
            creds["mqtt_client_id"],
            creds["mqtt_username"],
            creds["mqtt_password"],
        )
        try:
            topic = creds["topic_prefix"] + "telemetry"
            await asyncio.to_thread(device.publish, topic, b'{"t": 21.5}')
            got = await asyncio.to_thread(reader.wait_for, lambda m: m.topic == topic)
            assert got is not None
            assert got.payload == b'{"t": 21.5}'
        finally:
            await asyncio.to_thread(device.close)
    finally:
        await asyncio.to_thread(reader.close)


async def test_acl_refusals_on_the_cluster(deployment: Deployment, registry: DeviceRegistry) -> None:
    settings = broker_settings(deployment.database_url)
    creds = await provisioned(registry, settings, "02:00:00:00:0a:03")
    other = await provisioned(registry, settings, "02:00:00:00:0a:04")
    await make_account(AccountRegistry(registry.engine), "wide", ["subscribe #"])
    a, b = deployment.node_a, deployment.node_b
    me, own = creds["mqtt_client_id"], creds["topic_prefix"]
    cases: list[tuple[Node, str, str, str, dict[str, str | None], bool]] = [
        (a, me, "subscribe", own + "#", device_creds(creds), False),  # the positive controls
        (b, me, "publish", own + "telemetry", device_creds(creds), False),
        (a, me, "subscribe", other["topic_prefix"] + "#", device_creds(creds), True),
        (b, me, "publish", other["topic_prefix"] + "telemetry", device_creds(creds), True),
        (a, me, "publish", "provision/request", device_creds(creds), True),
        # "subscribe #" in its rules, yet RabbitMQ could deliver provisioning replies through it.
        (b, "wide", "subscribe", "#", {"username": "wide", "password": ACCOUNT_PASSWORD}, True),
        (
            a,
            "wide",
            "subscribe",
            "devices/+/state",
            {"username": "wide", "password": ACCOUNT_PASSWORD},
            False,
        ),
        # Anonymous provisioning sessions (mqtt.default_user), client id = MAC, in two notations.
        (a, "02:00:00:00:0a:05", "subscribe", "provision/reply/02:00:00:00:0a:05", {}, False),
        (b, "0200.0000.0a05", "subscribe", "provision/reply/0200.0000.0a05", {}, False),
        (a, "02:00:00:00:0a:05", "publish", "provision/request", {}, False),
        (b, "02:00:00:00:0a:05", "subscribe", "provision/reply/02:00:00:00:0a:06", {}, True),
        (a, "02:00:00:00:0a:05", "subscribe", "provision/reply/+", {}, True),
        (b, "02:00:00:00:0a:05", "publish", "provision/reply/02:00:00:00:0a:05", {}, True),
    ]
    for node, client_id, action, topic, credentials, expected in cases:
        outcome = await asyncio.to_thread(refused, node, client_id, action, topic, **credentials)
        assert outcome is expected, (node.name, client_id, action, topic)
    # Anonymous logins whose client id is not a MAC are no provisioning sessions.
    with RawSession(a.mqtt_port) as session:
        assert await asyncio.to_thread(session.connect, "not-a-mac") == REFUSED


async def test_decommission_refuses_the_next_login_on_both_nodes_and_closes_the_live_one(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    creds = await provisioned(registry, broker_settings(deployment.database_url), "02:00:00:00:0a:07")
    live = await asyncio.to_thread(
        connect, deployment.node_b, creds["mqtt_client_id"], creds["mqtt_username"], creds["mqtt_password"]
    )
    try:
        assert await asyncio.to_thread(live.subscribe, creds["topic_prefix"] + "#") == 1
        device = await registry.resolve(creds["device_id"])
        started = time.monotonic()
        await registry.decommission(device.id)
        assert await asyncio.to_thread(live.disconnected.wait, KICK_DEADLINE)
        kicked_after = time.monotonic() - started
    finally:
        await asyncio.to_thread(live.close)
    for node in deployment.cluster.nodes:
        assert await asyncio.to_thread(login, node, creds) == REFUSED
    print(f"live connection closed {kicked_after:.1f}s after the decommission")


async def test_a_rotated_account_is_closed_on_the_cluster_and_its_old_password_refused(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    accounts = AccountRegistry(registry.engine)
    await make_account(accounts, "rotating", ["subscribe devices/+/telemetry"])
    live = await asyncio.to_thread(connect, deployment.node_b, "rotating-1", "rotating", ACCOUNT_PASSWORD)
    try:
        assert await asyncio.to_thread(live.subscribe, "devices/+/telemetry") == 1
        await accounts.rotate("rotating", hashed("rotated-password-0005"))
        # The account still exists: only an authd that served it (and knows the old credential)
        # can tell that this connection logged in with the old password.
        assert await asyncio.to_thread(live.disconnected.wait, KICK_DEADLINE)
    finally:
        await asyncio.to_thread(live.close)
    old = {"mqtt_client_id": "rotating-2", "mqtt_username": "rotating", "mqtt_password": ACCOUNT_PASSWORD}
    for node in deployment.cluster.nodes:
        assert await asyncio.to_thread(login, node, old) == REFUSED
        assert (
            await asyncio.to_thread(login, node, old | {"mqtt_password": "rotated-password-0005"}) == ACCEPTED
        )
