"""The authorization matrix: every kind of principal against every kind of action, on a real broker.

One table (``MATRIX`` below) says who may do what; each row runs as its own test against one
broker shared by the module (rows open their own sessions and close them, so none disturbs
another). Every "deny" is checked after a positive control that *is* delivered after the
message in question (the broker handles one session's packets in order), never after a sleep.
Client-id take-over attempts follow the table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

import provisioning.registry.accounts
from broker.embedded import BrokerServer
from provisioning.contract import event_topic
from provisioning.registry import ACTIVE_STATUSES, DeviceInfo
from tests.auth_support import (
    ACCOUNT_PASSWORD,
    PASSWORD,
    RawSession,
    hashed,
    make_account,
    make_device,
    settings,
)
from tests.mqtt_clients import (
    ACCEPTED,
    BAD_USERNAME_OR_PASSWORD,
    NOT_AUTHORIZED,
    REPLY_PREFIX,
    REQUEST_TOPIC,
    SUBACK_FAILURE,
    WAIT,
    Client,
    Received,
)
from tests.test_hardening_sessions import QUEUED, leave_with_a_queued_message, resume
from tests.test_hardening_subscriptions import Wire

#: Every async test here runs on the loop of the module's shared broker.
on_shared_loop = pytest.mark.asyncio(loop_scope="module")

ANON_MAC = "02:00:00:00:0d:01"
A_MAC, B_MAC, GONE_MAC = "02:00:00:00:0d:0a", "02:00:00:00:0d:0b", "02:00:00:00:0d:0c"
NARROW_RULES = ["subscribe devices/+/telemetry", "publish devices/+/commands"]
WIDE_RULES = ["subscribe #", "publish #"]
RETAINED = b"retained-by-A"
#: How long a message that must arrive may take; a denied one is judged after a control instead.
ARRIVES = WAIT

# principal | action | target | expected.
#  principals: anon (provisioning session, no credentials), A and B (devices), gone
#  (decommissioned device), narrow (account: NARROW_RULES), wide (account: WIDE_RULES).
#  targets: {A} and {B} are the devices' namespaces (devices/<id>), {a_mac} {b_mac} {anon_mac}
#  their MACs, {a_event} the event topic of device A.
#  actions:
#   connect      CONNECT with the principal's credentials
#   subscribe    SUBSCRIBE to the filter: SUBACK granted or 0x80
#   publish      PUBLISH to the topic: does a session that would receive it get it
#                (the '#' observer; for provision/reply/<mac> the provisioning session of <mac>)
#   receive      subscribed to the filter before '>', does a broker-originated message on the
#                topic after '>' arrive
#   retained     SUBSCRIBE to the filter: does device A's retained {A}/telemetry arrive
#   on-connect   without subscribing anything, does any retained message arrive
#   will         CONNECT with a will on the topic, then drop the link: does the will arrive
MATRIX = """
anon   | connect    | -                                | allow
anon   | subscribe  | provision/reply/{anon_mac}       | allow
anon   | subscribe  | provision/reply/{a_mac}          | deny
anon   | subscribe  | provision/reply/#                | deny
anon   | subscribe  | provision/request                | deny
anon   | subscribe  | {A}/#                            | deny
anon   | subscribe  | #                                | deny
anon   | subscribe  | $SYS/#                           | deny
anon   | subscribe  | mqttprov/events/#                | deny
anon   | publish    | provision/request                | allow
anon   | publish    | provision/reply/{a_mac}          | deny
anon   | publish    | {A}/commands                     | deny
anon   | publish    | {a_event}                        | deny
anon   | retained   | {A}/#                            | deny
anon   | on-connect | -                                | deny
anon   | will       | provision/request                | deny
anon   | will       | {A}/status                       | deny
A      | connect    | -                                | allow
A      | subscribe  | {A}/#                            | allow
A      | subscribe  | {A}/telemetry                    | allow
A      | subscribe  | {B}/#                            | deny
A      | subscribe  | devices/+/telemetry              | deny
A      | subscribe  | provision/request                | deny
A      | subscribe  | provision/reply/{a_mac}          | deny
A      | subscribe  | provision/reply/{b_mac}          | deny
A      | subscribe  | provision/reply/#                | deny
A      | subscribe  | #                                | deny
A      | subscribe  | $SYS/#                           | deny
A      | subscribe  | mqttprov/events/#                | deny
A      | publish    | {A}/telemetry                    | allow
A      | publish    | {B}/commands                     | deny
A      | publish    | provision/request                | deny
A      | publish    | provision/reply/{anon_mac}       | deny
A      | publish    | {a_event}                        | deny
A      | receive    | {A}/# > {A}/commands             | allow
A      | retained   | {A}/#                            | allow
A      | on-connect | -                                | deny
A      | will       | {A}/status                       | allow
A      | will       | {B}/status                       | deny
A      | will       | provision/request                | deny
B      | connect    | -                                | allow
B      | subscribe  | {B}/#                            | allow
B      | subscribe  | {A}/#                            | deny
B      | publish    | {A}/commands                     | deny
B      | retained   | {A}/#                            | deny
B      | retained   | devices/+/telemetry              | deny
B      | on-connect | -                                | deny
gone   | connect    | -                                | deny
narrow | connect    | -                                | allow
narrow | subscribe  | devices/+/telemetry              | allow
narrow | subscribe  | {A}/telemetry                    | allow
narrow | subscribe  | {A}/#                            | deny
narrow | subscribe  | devices/#                        | deny
narrow | subscribe  | provision/reply/#                | deny
narrow | subscribe  | #                                | deny
narrow | subscribe  | $SYS/#                           | deny
narrow | subscribe  | mqttprov/events/#                | deny
narrow | publish    | {A}/commands                     | allow
narrow | publish    | {A}/telemetry                    | deny
narrow | publish    | provision/request                | deny
narrow | publish    | {a_event}                        | deny
narrow | receive    | devices/+/telemetry > {B}/telemetry | allow
narrow | retained   | devices/+/telemetry              | allow
narrow | on-connect | -                                | deny
narrow | will       | {A}/commands                     | allow
narrow | will       | {A}/telemetry                    | deny
wide   | connect    | -                                | allow
wide   | subscribe  | #                                | allow
wide   | subscribe  | $SYS/#                           | deny
wide   | subscribe  | mqttprov/events/#                | allow
wide   | publish    | {A}/commands                     | allow
wide   | publish    | provision/request                | deny
wide   | publish    | provision/reply/{anon_mac}       | deny
wide   | publish    | {a_event}                        | deny
wide   | receive    | # > {A}/commands                 | allow
wide   | receive    | # > {a_event}                    | allow
wide   | receive    | # > provision/reply/{a_mac}      | deny
wide   | receive    | provision/reply/# > provision/reply/{a_mac} | deny
wide   | retained   | #                                | allow
wide   | on-connect | -                                | deny
wide   | will       | {A}/status                       | allow
wide   | will       | {a_event}                        | deny
wide   | will       | provision/request                | deny
"""


@dataclass(frozen=True)
class Row:
    """One line of the matrix."""

    principal: str
    action: str
    target: str
    allowed: bool

    @property
    def name(self) -> str:
        """The test id."""
        verdict = "allow" if self.allowed else "deny"
        return f"{self.principal} {self.action} {self.target} -> {verdict}"


def rows() -> list[Row]:
    """The matrix, parsed."""
    parsed = []
    for line in MATRIX.strip().splitlines():
        principal, action, target, expected = (cell.strip() for cell in line.split("|"))
        assert expected in ("allow", "deny"), line
        parsed.append(Row(principal, action, target, expected == "allow"))
    return parsed


@dataclass
class World:
    """The shared broker, its principals, and the observer subscribed to '#'."""

    server: BrokerServer
    loop: asyncio.AbstractEventLoop
    devices: dict[str, DeviceInfo]
    observer: Client

    @property
    def port(self) -> int:
        """The broker's MQTT port."""
        return self.server.settings.broker.port

    def fill(self, template: str) -> str:
        """A target with its placeholders filled in."""
        a, b = self.devices["A"], self.devices["B"]
        return template.format(
            A=f"devices/{a.id}",
            B=f"devices/{b.id}",
            a_mac=A_MAC,
            b_mac=B_MAC,
            anon_mac=ANON_MAC,
            a_event=event_topic(a.id),
        )

    def client(self, principal: str, *, will: tuple[str, bytes] | None = None) -> Client:
        """An unconnected paho client presenting ``principal``'s credentials."""
        if principal == "anon":
            return Client(self.port, ANON_MAC, will=will)
        if principal in ("narrow", "wide"):
            return Client(
                self.port,
                f"{principal}-{uuid.uuid4().hex[:6]}",
                username=principal,
                password=ACCOUNT_PASSWORD,
                will=will,
            )
        user = self.devices[principal].mqtt_username
        return Client(self.port, user, username=user, password=PASSWORD, will=will)

    def announce(self, topic: str, payload: bytes) -> None:
        """A broker-originated publish (as the events are), from a client thread."""
        done = asyncio.run_coroutine_threadsafe(self.server.broker.announce(topic, payload), self.loop)
        done.result(WAIT)

    def control(self, client: Client, principal: str) -> None:
        """A message that must reach ``client`` now: everything sent to it before is here by then."""
        if principal == "anon":
            reply = client.request({"mac": ANON_MAC, "request_id": uuid.uuid4().hex})
            assert reply is not None
            return
        topic = self.fill({"A": "{A}/control", "B": "{B}/control"}.get(principal, "{B}/telemetry"))
        assert client.subscribe(topic) != SUBACK_FAILURE
        payload = uuid.uuid4().bytes
        start = len(client.messages)
        self.announce(topic, payload)
        assert client.wait_for(lambda m: m.payload == payload, ARRIVES, after=start) is not None


@contextmanager
def connected(world: World, principal: str) -> Iterator[Client]:
    """A connected session of ``principal`` (anon: subscribed to its reply topic); closed after."""
    client = world.client(principal)
    try:
        assert client.connect() == ACCEPTED
        if principal == "anon":
            assert client.subscribe(REPLY_PREFIX + ANON_MAC) != SUBACK_FAILURE
        yield client
    finally:
        client.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """One broker for the whole matrix, with A, B, a decommissioned device and two accounts."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('authz') / 'registry.db'}"
    # Refused rows add up from 127.0.0.1: no throttling, lockout or provisioning rate limits here.
    config = settings(url, throttle_after=10_000, lockout_after=10_000, max_refusal_delay=0.01)
    config = config.model_copy(
        update={"provisioning": config.provisioning.model_copy(update={"mac_burst": 10_000})}
    )
    async with BrokerServer(config) as server:
        devices = {
            name: await make_device(server.registry, mac)
            for name, mac in (("A", A_MAC), ("B", B_MAC), ("gone", GONE_MAC))
        }
        await server.registry.decommission(devices["gone"].id)
        await make_account(server.accounts, "narrow", NARROW_RULES)
        await make_account(server.accounts, "wide", WIDE_RULES)
        observer = Client(
            server.settings.broker.port, "wide-observer", username="wide", password=ACCOUNT_PASSWORD
        )
        state = World(server, asyncio.get_running_loop(), devices, observer)
        await asyncio.to_thread(_start_observer, state)
        try:
            yield state
        finally:
            await asyncio.to_thread(observer.close)


def _start_observer(world: World) -> None:
    assert world.observer.connect() == ACCEPTED
    assert world.observer.subscribe("#") != SUBACK_FAILURE
    with connected(world, "A") as device:  # A leaves a retained message in its own namespace
        device.publish(world.fill("{A}/telemetry"), RETAINED, retain=True)
    assert world.observer.wait_for(lambda m: m.payload == RETAINED, ARRIVES) is not None


# -- the probes: each answers "did it happen?" ----------------------------------------------------


def probe_connect(world: World, principal: str, _target: str) -> bool:
    client = world.client(principal)
    try:
        code = client.connect()
    finally:
        client.close()
    assert code in (ACCEPTED, BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED), code
    return code == ACCEPTED


def probe_subscribe(world: World, principal: str, target: str) -> bool:
    with connected(world, principal) as client:
        granted = client.subscribe(target) != SUBACK_FAILURE
        # Let a retained message the subscription brings arrive before leaving: amqtt drops a
        # connection that ends mid-delivery without waiting for its transport to close.
        world.control(client, principal)
        return granted


def probe_publish(world: World, principal: str, target: str) -> bool:
    payload = b"matrix-" + uuid.uuid4().hex.encode()
    if target == REQUEST_TOPIC:
        return _publish_request(world, principal)
    watcher: Client | None = None
    if target.startswith(REPLY_PREFIX):  # a forged reply: would its victim get it?
        watcher = Client(world.port, target.removeprefix(REPLY_PREFIX))
        assert watcher.connect() == ACCEPTED
        assert watcher.subscribe(target) != SUBACK_FAILURE
    seen = watcher or world.observer
    start = len(seen.messages)
    try:
        with connected(world, principal) as client:
            client.publish(target, payload)
            world.control(client, principal)
        if watcher is not None:
            watcher.request({"mac": target.removeprefix(REPLY_PREFIX)})  # its own, later reply
        else:
            _observer_control(world)
        return any(m.payload == payload for m in seen.messages[start:])
    finally:
        if watcher is not None:
            watcher.close()


def _publish_request(world: World, principal: str) -> bool:
    """Did the provisioning plugin see it? (A reply for anon, a 'dropped' log line for others.)"""
    with connected(world, principal) as client:
        if principal == "anon":
            return client.request({"mac": ANON_MAC}) is not None
        client.publish(REQUEST_TOPIC, {"mac": A_MAC})
        world.control(client, principal)
        return client.client_id in _dropped_requests


def _observer_control(world: World) -> None:
    payload = uuid.uuid4().bytes
    start = len(world.observer.messages)
    world.announce(world.fill("{A}/observer-control"), payload)
    assert world.observer.wait_for(lambda m: m.payload == payload, ARRIVES, after=start) is not None


def probe_receive(world: World, principal: str, target: str) -> bool:
    topic_filter, topic = (part.strip() for part in target.split(">"))
    payload = b"receive-" + uuid.uuid4().hex.encode()
    with connected(world, principal) as client:
        assert client.subscribe(topic_filter) != SUBACK_FAILURE, "the row needs a granted subscription"
        start = len(client.messages)
        world.announce(topic, payload)
        world.control(client, principal)
        return any(m.payload == payload for m in client.messages[start:])


def probe_retained(world: World, principal: str, target: str) -> bool:
    with connected(world, principal) as client:
        client.subscribe(target)
        world.control(client, principal)
        return any(m.payload == RETAINED for m in client.messages)


def probe_on_connect(world: World, principal: str, _target: str) -> bool:
    with connected(world, principal) as client:
        world.control(client, principal)
        return any(m.retain for m in client.messages)


def probe_will(world: World, principal: str, target: str) -> bool:
    payload = b"will-" + uuid.uuid4().hex.encode()
    start = len(world.observer.messages)
    client_id, credentials = _raw_login(world, principal)
    session = RawSession(world.port)
    try:
        code = session.connect(client_id, will=(target, payload), **credentials)
    finally:
        session.close()  # no DISCONNECT: a lost link, so the will is due
    if code != ACCEPTED:
        return False
    return world.observer.wait_for(lambda m: m.payload == payload, ARRIVES, after=start) is not None


def _raw_login(world: World, principal: str) -> tuple[str, dict[str, Any]]:
    if principal == "anon":
        return ANON_MAC, {}
    if principal in ("narrow", "wide"):
        return f"{principal}-will", {"username": principal, "password": ACCOUNT_PASSWORD}
    user = world.devices[principal].mqtt_username
    return user, {"username": user, "password": PASSWORD}


PROBES: dict[str, Callable[[World, str, str], bool]] = {
    "connect": probe_connect,
    "subscribe": probe_subscribe,
    "publish": probe_publish,
    "receive": probe_receive,
    "retained": probe_retained,
    "on-connect": probe_on_connect,
    "will": probe_will,
}

# Client ids the provisioning plugin logged as "dropped a provisioning request from ...": such a
# request got past the ACL, which only provisioning sessions may.
_dropped_requests: set[str] = set()


class _DroppedRequests(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("dropped a provisioning request from non-provisioning client"):
            _dropped_requests.add(str(record.args[0]) if isinstance(record.args, tuple) else "")


@pytest.fixture(autouse=True)
def _watch_dropped_requests() -> Iterator[None]:
    handler = _DroppedRequests()
    plugin_logger = logging.getLogger("broker.embedded.plugins.provisioning")
    plugin_logger.addHandler(handler)
    try:
        yield
    finally:
        plugin_logger.removeHandler(handler)


@pytest.mark.slow
@on_shared_loop
@pytest.mark.parametrize("row", rows(), ids=lambda row: row.name)
async def test_matrix(world: World, row: Row) -> None:
    happened = await asyncio.to_thread(PROBES[row.action], world, row.principal, world.fill(row.target))
    assert happened is row.allowed


def test_the_matrix_covers_every_principal_and_action() -> None:
    table = rows()
    assert {r.principal for r in table} == {"anon", "A", "B", "gone", "narrow", "wide"}
    assert {r.action for r in table} == set(PROBES)
    assert len({(r.principal, r.action, r.target) for r in table}) == len(table), "duplicate rows"


# -- client-id take-over attempts ------------------------------------------------------------------


@on_shared_loop
@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(
            ("{a_user}", "{a_user}", "wrong-password", BAD_USERNAME_OR_PASSWORD), id="wrong-password"
        ),
        pytest.param(("{a_user}", "{b_user}", PASSWORD, NOT_AUTHORIZED), id="device-B-with-A-client-id"),
        pytest.param(("{a_user}", None, None, NOT_AUTHORIZED), id="anonymous-with-A-client-id"),
        pytest.param(
            ("{a_user}", "wide", ACCOUNT_PASSWORD, NOT_AUTHORIZED), id="wide-account-with-A-client-id"
        ),
        pytest.param(("{a_user}", "{a_user}", "", BAD_USERNAME_OR_PASSWORD), id="empty-password"),
    ],
)
async def test_a_take_over_attempt_does_not_disturb_the_victim(
    world: World, attempt: tuple[str, str | None, str | None, int]
) -> None:
    users = {"a_user": world.devices["A"].mqtt_username, "b_user": world.devices["B"].mqtt_username}
    client_id, username, password, expected = attempt

    def attack() -> tuple[int, bool, bool]:
        with connected(world, "A") as victim:
            assert victim.subscribe(world.fill("{A}/#")) != SUBACK_FAILURE
            with RawSession(world.port) as attacker:
                code = attacker.connect(
                    client_id.format(**users),
                    username=None if username is None else username.format(**users),
                    password=password,
                )
            # Still connected, and still receiving what is published to it.
            alive = victim.roundtrip(world.fill("{A}/after-attack"), b"still here")
            return code, alive, victim.disconnected.is_set()

    code, alive, dropped = await asyncio.to_thread(attack)
    assert code == expected
    assert alive
    assert not dropped


@on_shared_loop
async def test_a_valid_login_of_the_same_device_takes_over_as_mqtt_says(world: World) -> None:
    def take_over() -> tuple[bool, bool, list[Received]]:
        with connected(world, "B") as first, connected(world, "B") as second:
            gone = first.disconnected.wait(WAIT)
            assert second.subscribe(world.fill("{B}/#")) != SUBACK_FAILURE
            alive = second.roundtrip(world.fill("{B}/after-take-over"), b"second")
            return gone, alive, list(first.messages)

    gone, alive, first_got = await asyncio.to_thread(take_over)
    assert gone
    assert alive
    assert all(m.payload != b"second" for m in first_got)


# -- session resume across principal kinds --------------------------------------------------------

# first | second | expected: the first principal leaves a persistent session (clean session 0)
# subscribed to a topic it may receive, offline, with one QoS 1 message queued for it (anon:
# nothing can be queued for a provisioning session); the second connects with the same client id
# and clean session 0.
#  principals: A, B, anon, wide as above (fresh ones per row); A-reissued is A after a new
#  password was issued to it; narrower and wider are the first account removed and made again
#  under its name with NARROW_RULES or WIDE_RULES; mac-account an account named like the first
#  group of anon's MAC (made before such names were refused), with anon's client id.
#  expected:
#   resumed  CONNACK 0, session present 1, the queued message delivered
#   fresh    CONNACK 0, session present 0, nothing delivered: the old session was discarded
#   refused  CONNACK 5, nothing delivered, and the first principal's session is still its own
RESUME = """
A      | A           | resumed
A      | B           | refused
A      | anon        | refused
A      | wide        | refused
A      | A-reissued  | fresh
narrow | narrow      | resumed
wide   | narrower    | fresh
narrow | wider       | fresh
anon   | anon        | fresh
anon   | mac-account | refused
"""
RESUME_MAC = "02:00:00:00:0d:0e"
RESUME_MAC_CLIENT_ID = "02-00-00-00-0d-0e"
Login = dict[str, Any]
#: The last byte of each resume row's device MAC: unique across the rows, which share one server.
_RESUME_MACS = itertools.count(1)


def resume_rows() -> list[tuple[str, str, str]]:
    """The resume table, parsed."""
    parsed = []
    for line in RESUME.strip().splitlines():
        first, second, expected = (cell.strip() for cell in line.split("|"))
        assert expected in ("resumed", "fresh", "refused"), line
        parsed.append((first, second, expected))
    return parsed


async def _first_principal(world: World, first: str) -> tuple[str, Login, str | None]:
    """A fresh principal of kind ``first``: its client id, its login, a topic it may receive."""
    server = world.server
    if first in ("A", "B"):
        device = await make_device(server.registry, f"02:00:00:00:0e:{next(_RESUME_MACS):02x}")
        world.devices[f"resume-{device.id}"] = device
        login = {"username": device.mqtt_username, "password": PASSWORD}
        return device.mqtt_username, login, f"devices/{device.id}/commands"
    if first == "anon":
        return RESUME_MAC_CLIENT_ID, {}, None
    name = f"resume_{uuid.uuid4().hex[:8]}"
    await make_account(server.accounts, name, NARROW_RULES if first == "narrow" else WIDE_RULES)
    return f"{name}-p", {"username": name, "password": ACCOUNT_PASSWORD}, "devices/x/telemetry"


async def _second_login(
    world: World, second: str, first_login: Login, monkeypatch: pytest.MonkeyPatch
) -> Login:
    """The second principal's login, after the change the row names (re-issue, re-creation)."""
    server = world.server
    if second == "B":
        user = world.devices["B"].mqtt_username
        return {"username": user, "password": PASSWORD}
    if second == "anon":
        return {}
    if second == "wide":
        return {"username": "wide", "password": ACCOUNT_PASSWORD}
    if second == "A-reissued":
        record = await server.registry.find_credentials_by_username(first_login["username"])
        assert record is not None
        await server.registry.issue_credentials(
            record.device.id,
            hashed(PASSWORD),
            expected_hash=record.password_hash,
            allowed_from=set(ACTIVE_STATUSES),  # online or offline by now
        )
    elif second in ("narrower", "wider"):
        await server.accounts.remove(first_login["username"])
        rules = NARROW_RULES if second == "narrower" else WIDE_RULES
        await make_account(server.accounts, first_login["username"], rules)
    elif second == "mac-account":
        # Named before names like it were refused (test_hardening_sessions has the refusal).
        monkeypatch.setattr(provisioning.registry.accounts, "validate_account_name", lambda name: name)
        await server.accounts.add(RESUME_MAC_CLIENT_ID[:2], hashed(ACCOUNT_PASSWORD), [])
        return {"username": RESUME_MAC_CLIENT_ID[:2], "password": ACCOUNT_PASSWORD}
    return first_login


def _leave_provisioning_session(port: int) -> None:
    wire = Wire(port, RESUME_MAC_CLIENT_ID, clean_session=False)
    assert wire.code == ACCEPTED
    assert wire.subscribe([REPLY_PREFIX + RESUME_MAC_CLIENT_ID]) == [1]
    wire.disconnect()


@on_shared_loop
@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [pytest.param(*row, id=f"{row[0]} -> {row[1]}: {row[2]}") for row in resume_rows()],
)
async def test_session_resume(
    world: World, first: str, second: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = world.port
    client_id, first_login, topic = await _first_principal(world, first)
    if topic is None:
        await asyncio.to_thread(_leave_provisioning_session, port)
    else:
        await asyncio.to_thread(
            leave_with_a_queued_message, port, client_id, topic, feeder="wide", **first_login
        )
    login = await _second_login(world, second, first_login, monkeypatch)
    code, present, received = await asyncio.to_thread(resume, port, client_id, **login)
    outcome = {(ACCEPTED, 1): "resumed", (ACCEPTED, 0): "fresh"}.get((code, present), "refused")
    assert outcome == expected
    if outcome == "resumed":
        assert received == [(topic, QUEUED)]
        return
    assert received == []
    if outcome == "refused":
        assert code == NOT_AUTHORIZED
        if topic is not None:  # a refused CONNECT never touches the owner's session
            assert await asyncio.to_thread(resume, port, client_id, **first_login) == (
                ACCEPTED,
                1,
                [(topic, QUEUED)],
            )


def test_the_resume_table_covers_every_kind_of_principal() -> None:
    table = resume_rows()
    firsts, seconds = {row[0] for row in table}, {row[1] for row in table}
    assert {"A", "narrow", "wide", "anon"} <= firsts
    assert {"A", "B", "anon", "wide", "narrow"} <= seconds
    assert len({row[:2] for row in table}) == len(table), "duplicate rows"
