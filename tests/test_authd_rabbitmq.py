"""authd as the HTTP auth backend of a real two-node RabbitMQ 3.10 cluster (tests/rabbitmq_cluster.py).

One cluster and one ``mqttprov authd`` process serve the whole module (a node takes ~10 s to
start). Devices are provisioned by the real provisioning worker
(``broker.external.worker.run_registry_worker``, ``credentials = "registry"``) or, where a test is
about something else, directly by the provisioning service on the module's registry; MQTT clients
are paho-mqtt or raw sockets, called from threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.external.worker import run_registry_worker
from config import Settings
from provisioning.contract import OkReply, identity_from_client_id
from provisioning.external.link import ExternalBrokerError, parse_broker_url
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.service import Outcome, ProvisioningService
from tests.auth_support import ACCOUNT_PASSWORD, RawSession, hashed, make_account
from tests.authd_support import SECRET, authd_process, client_for, write_authd_config
from tests.helpers import broker_settings, free_port, mqttprov_executable, run_mqttprov
from tests.mqtt_clients import Client, assert_ok, provisioning_session
from tests.rabbitmq_cluster import KICK_EXPRESSION, Cluster, Node, rabbitmq_cluster, rabbitmq_missing

pytestmark = [
    pytest.mark.skipif(rabbitmq_missing() is not None, reason=rabbitmq_missing() or ""),
    pytest.mark.slow,
]

ACCEPTED = 0
#: RabbitMQ 3.10 answers every refused MQTT login with CONNACK 4 (bad username or password).
REFUSED = 4
#: How long the kick of a live connection may take: the change feed (0.5 s poll on SQLite) plus
#: one ``rabbitmqctl eval`` (an Erlang VM start: ~2 s measured here on two cores).
KICK_DEADLINE = 10.0
#: The provisioning worker's account (``external.worker_username``); it connects with client id
#: ``mqttprov_worker-<pid>-<hex>``, which authd accepts for it (NAME-<anything>).
WORKER = "mqttprov_worker"
WORKER_RULES = [
    "subscribe provision/request",
    "publish provision/reply/+",
    "publish mqttprov/events/device/+",
]
#: How long the worker may take to subscribe, answer or stop (a node's first bind can take seconds).
WORKER_WAIT = 15.0


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


@contextmanager
def deployed(base: Path, *, auth_cache_ttl_ms: int | None = None) -> Iterator[Deployment]:
    """An SQLite registry, authd with the kick command, and a cluster asking it (through
    RabbitMQ's auth cache with ``auth_cache_ttl_ms``), until the block ends."""
    database_url = f"sqlite+aiosqlite:///{base / 'registry.db'}"
    port = free_port()
    # The secret as the password of the URL's user info: RabbitMQ sends it as HTTP basic auth.
    cluster = Cluster(
        base / "cluster", f"http://rabbitmq:{SECRET}@127.0.0.1:{port}", auth_cache_ttl_ms=auth_cache_ttl_ms
    )
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


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(tmp_path_factory.mktemp("rabbitmq")) as made:
        yield made


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


def device_creds(creds: dict[str, Any]) -> dict[str, str | None]:
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


async def worker_account(registry: DeviceRegistry, name: str = WORKER) -> None:
    """The worker's service account with the rules authd requires (created once per module)."""
    accounts = AccountRegistry(registry.engine)
    if await accounts.find(name) is None:
        await make_account(accounts, name, WORKER_RULES)


def worker_settings(deployment: Deployment, **external: Any) -> Settings:
    """``credentials = "registry"`` on node a, as docs/scaling-out.md shows it (shared_group empty)."""
    base = broker_settings(deployment.database_url)
    section = {
        "credentials": "registry",
        "broker": f"mqtt://127.0.0.1:{deployment.node_a.mqtt_port}",
        "worker_username": WORKER,
        "worker_password": ACCOUNT_PASSWORD,
        "shared_group": "",
    } | external
    return Settings.model_validate(base.model_dump() | {"external": section})


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    """:func:`broker.external.worker.run_registry_worker` until the block ends (subscribed on entry)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    address = parse_broker_url(settings.external.broker)
    task = asyncio.create_task(run_registry_worker(settings, address, stop, ready), name="test-worker")
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=WORKER_WAIT, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    try:
        if task in done:
            task.result()
        assert waiter in done, f"worker not subscribed within {WORKER_WAIT}s"
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WORKER_WAIT)
    assert task.exception() is None


def snooper(node: Node, client_id: str, topic_filter: str, password: str) -> RawSession:
    """A session of account ``spy`` (rules ``subscribe #``) that has sent SUBSCRIBE ``topic_filter``."""
    session = RawSession(node.mqtt_port)
    assert session.connect(client_id, username="spy", password=password) == ACCEPTED
    session.sock.sendall(_packet(0x82, struct.pack("!H", 1) + _text(topic_filter) + b"\x01"))
    return session


def drained(session: RawSession, within: float = 5.0) -> bytes:
    """Everything the broker sent ``session`` until it closed it (or ``within`` seconds passed)."""
    received = b""
    session.sock.settimeout(within)
    try:
        while chunk := session.sock.recv(4096):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        session.close()
    return received


def enrol(node: Node, mac: str) -> dict[str, Any]:
    """The firmware's own exchange: anonymous, client id = MAC; the ``ok`` reply's credentials."""
    with provisioning_session(node.mqtt_port, mac) as device:
        reply = device.request({"mac": mac}, timeout=WORKER_WAIT)
    assert reply is not None, f"no reply for {mac}"
    assert reply.topic == f"provision/reply/{mac}"
    creds = reply.json()
    assert_ok(creds)
    return dict(creds)


async def test_the_worker_provisions_a_device_on_node_b_that_logs_in_on_node_a(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    await worker_account(registry)
    await make_account(AccountRegistry(registry.engine), "spy", ["subscribe #"])
    mac = "02:00:00:00:0a:08"
    cli = ("--config", str(deployment.config))
    async with running_worker(worker_settings(deployment)):
        # Sessions that would see every reply if the broker let them subscribe so wide.
        spies = [
            await asyncio.to_thread(snooper, deployment.node_a, "spy-1", "#", ACCOUNT_PASSWORD),
            await asyncio.to_thread(
                snooper, deployment.node_b, "spy-2", "provision/reply/#", ACCOUNT_PASSWORD
            ),
        ]
        creds = await asyncio.to_thread(enrol, deployment.node_b, mac)
        assert await asyncio.to_thread(login, deployment.node_a, creds) == ACCEPTED
        for spy in spies:
            assert await asyncio.to_thread(drained, spy) == b""  # refused: closed, not even a SUBACK

        # An operator's reset in another process: authd answers a warm login from its cache, so
        # the old password is refused once its change feed sees the reset (0.5 s poll on SQLite,
        # within 2 s by contract); then the device enrols again.
        done = await asyncio.to_thread(
            run_mqttprov, "devices", "reset", mac, *cli, cwd=deployment.config.parent
        )
        assert done.returncode == 0, done.stderr
        assert await refused_soon(deployment.node_a, creds)
        again = await asyncio.to_thread(enrol, deployment.node_b, mac)
        assert again["mqtt_username"] == creds["mqtt_username"]
        assert again["mqtt_password"] != creds["mqtt_password"]
        assert await asyncio.to_thread(login, deployment.node_a, again) == ACCEPTED
        assert await asyncio.to_thread(login, deployment.node_a, creds) == REFUSED

    done = await asyncio.to_thread(
        run_mqttprov, "devices", "decommission", mac, *cli, cwd=deployment.config.parent
    )
    assert done.returncode == 0, done.stderr
    # As for the reset: refused once authd's change feed (0.5 s poll on SQLite) has seen it.
    for node in deployment.cluster.nodes:
        assert await refused_soon(node, again)


async def refused_soon(node: Node, creds: dict[str, Any]) -> bool:
    """True once a login with ``creds`` is refused on ``node``, trying until KICK_DEADLINE."""
    deadline = time.monotonic() + KICK_DEADLINE
    while await asyncio.to_thread(login, node, creds) != REFUSED:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)  # polling against the deadline above
    return True


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


def _lost_with_will(node: Node, creds: dict[str, Any], topic: str, message: bytes) -> int:
    """Log in with a will on ``topic``, then drop the link (the broker publishes the will)."""
    session = RawSession(node.mqtt_port)
    try:
        return session.connect(
            creds["mqtt_client_id"],
            username=creds["mqtt_username"],
            password=creds["mqtt_password"],
            will=(topic, message),
        )
    finally:
        session.close()


async def test_a_will_outside_the_devices_namespace_is_not_delivered(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    settings = broker_settings(deployment.database_url)
    creds = await provisioned(registry, settings, "02:00:00:00:0a:20")
    other = await provisioned(registry, settings, "02:00:00:00:0a:21")
    await make_account(AccountRegistry(registry.engine), "willreader", ["subscribe devices/#"])
    reader = await asyncio.to_thread(
        connect, deployment.node_b, "willreader-1", "willreader", ACCOUNT_PASSWORD
    )
    own, foreign = creds["topic_prefix"] + "status", other["topic_prefix"] + "commands"
    try:
        assert await asyncio.to_thread(reader.subscribe, "devices/#") == 1
        a = deployment.node_a
        # A will in its own namespace is delivered (the positive control) ...
        assert await asyncio.to_thread(_lost_with_will, a, creds, own, b"gone-1") == ACCEPTED
        assert await asyncio.to_thread(reader.wait_for, lambda m: m.payload == b"gone-1") is not None
        # ... one into another device's namespace is not: RabbitMQ 3.10 accepts the CONNECT and
        # asks authd's topic check when it publishes the will, which refuses it.
        assert await asyncio.to_thread(_lost_with_will, a, creds, foreign, b"forged") == ACCEPTED
        assert await asyncio.to_thread(_lost_with_will, a, creds, own, b"gone-2") == ACCEPTED
        assert await asyncio.to_thread(reader.wait_for, lambda m: m.payload == b"gone-2") is not None
        assert [m.topic for m in reader.messages if m.payload == b"forged"] == []
    finally:
        await asyncio.to_thread(reader.close)


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


async def test_a_shared_subscription_receives_nothing_on_rabbitmq(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    # RabbitMQ 3.10 has no shared subscriptions: it grants $share/<group>/provision/request as a
    # literal filter that no request matches, hence shared_group = "" in docs/scaling-out.md.
    await worker_account(registry)
    mac = "02:00:00:00:0a:31"
    with provisioning_session(deployment.node_b.mqtt_port, mac) as device:
        async with running_worker(worker_settings(deployment, shared_group="mqttprov")):
            assert await asyncio.to_thread(device.request, {"mac": mac}, 3) is None
        async with running_worker(worker_settings(deployment)):  # the control: shared_group = ""
            reply = await asyncio.to_thread(device.request, {"mac": mac}, WORKER_WAIT)
    assert reply is not None
    assert_ok(reply.json())


async def test_the_worker_refuses_to_start_without_the_rules_it_needs(
    deployment: Deployment, registry: DeviceRegistry
) -> None:
    await make_account(AccountRegistry(registry.engine), "narrow_worker", WORKER_RULES[:2])
    settings = worker_settings(deployment, worker_username="narrow_worker")
    stop = asyncio.Event()
    with pytest.raises(ExternalBrokerError, match="lacks 'publish mqttprov/events/device/"):
        await run_registry_worker(settings, parse_broker_url(settings.external.broker), stop)
    settings = worker_settings(deployment, worker_username="nobody_here")
    with pytest.raises(ExternalBrokerError, match="no service account 'nobody_here'"):
        await run_registry_worker(settings, parse_broker_url(settings.external.broker), stop)


async def test_mqttprov_worker_serves_until_sigterm_and_logs_no_password(
    deployment: Deployment, registry: DeviceRegistry, tmp_path: Path
) -> None:
    await worker_account(registry)
    config = write_authd_config(tmp_path / "worker.toml", deployment.database_url, free_port())
    external = {
        "credentials": "registry",
        "broker": f"mqtt://127.0.0.1:{deployment.node_a.mqtt_port}",
        "worker_username": WORKER,
        "shared_group": "",
    }
    with config.open("a", encoding="utf-8") as out:
        out.write("[external]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in external.items()))
    log = tmp_path / "worker.log"
    env = {**os.environ, "MQTTPROV_EXTERNAL__WORKER_PASSWORD": ACCOUNT_PASSWORD}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [mqttprov_executable(), "worker", "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + WORKER_WAIT
        while "provisioning worker serving" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.1)  # polling the log against the deadline above
        creds = await asyncio.to_thread(enrol, deployment.node_b, "02:00:00:00:0a:32")
        assert await asyncio.to_thread(login, deployment.node_a, creds) == ACCEPTED
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert "provisioning worker serving provision/request" in text
    assert ACCOUNT_PASSWORD not in text
    assert creds["mqtt_password"] not in text


#: The TTL of RabbitMQ's auth cache in the cached deployment: long enough that a login made right
#: after authd has seen a revocation is still answered from the cache on any machine.
CACHE_TTL_MS = 20_000


@pytest.fixture(scope="module")
def cached_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A second cluster with ``rabbitmq_auth_backend_cache`` in front of the HTTP backend."""
    with deployed(tmp_path_factory.mktemp("rabbitmq-cached"), auth_cache_ttl_ms=CACHE_TTL_MS) as made:
        yield made


async def authd_denies(url: str, creds: dict[str, Any]) -> bool:
    """True once authd itself answers "deny" to this login, trying until KICK_DEADLINE."""
    deadline = time.monotonic() + KICK_DEADLINE
    async with client_for(url) as client:
        while (
            await client.rabbit_user(creds["mqtt_username"], creds["mqtt_password"], creds["mqtt_client_id"])
            != "deny"
        ):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)  # polling against the deadline above
    return True


@pytest.mark.slow
async def test_with_rabbitmqs_auth_cache_a_revoked_login_is_accepted_until_the_ttl_and_the_live_one_closed(
    cached_deployment: Deployment,
) -> None:
    # What docs/scaling-out.md says of rabbitmq_auth_backend_cache: it keeps allowed logins for
    # its TTL whatever authd now answers, so a decommissioned device logs in again until then;
    # the kick still closes the live connection at once.
    deployment = cached_deployment
    reg = DeviceRegistry(create_engine(deployment.database_url))
    try:
        creds = await provisioned(reg, broker_settings(deployment.database_url), "02:00:00:00:0c:01")
        # A login on node a (cached there) and a live connection on node b.
        assert await asyncio.to_thread(login, deployment.node_a, creds) == ACCEPTED
        live = await asyncio.to_thread(
            connect,
            deployment.node_b,
            creds["mqtt_client_id"],
            creds["mqtt_username"],
            creds["mqtt_password"],
        )
        try:
            await reg.decommission((await reg.resolve(creds["device_id"])).id)
            assert await asyncio.to_thread(live.disconnected.wait, KICK_DEADLINE)
        finally:
            await asyncio.to_thread(live.close)
    finally:
        await reg.close()
    assert await authd_denies(deployment.authd_url, creds)
    # authd says no, yet node a's cache still says yes ...
    assert await asyncio.to_thread(login, deployment.node_a, creds) == ACCEPTED
    # ... until its entry expires; from then on the login reaches authd and is refused.
    deadline = time.monotonic() + CACHE_TTL_MS / 1000 + KICK_DEADLINE
    while await asyncio.to_thread(login, deployment.node_a, creds) != REFUSED:
        assert time.monotonic() < deadline, "still accepted long after the auth cache's TTL"
        await asyncio.sleep(0.5)  # polling against the deadline above
