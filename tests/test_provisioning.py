"""Provisioning end to end: the wire contract as firmware sees it, over a real in-process broker.

Clients are paho-mqtt (or raw sockets) in worker threads; see :mod:`tests.mqtt_clients`.
Policy (modes, proofs, re-provisioning, rate limits) is in ``test_provisioning_policy.py``,
topic isolation in ``test_provisioning_privacy.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioning.errors import InvalidMacError
from provisioning.mac import parse_device_mac, parse_mac
from provisioning.registry import DeviceStatus
from tests.mqtt_clients import (
    ACCEPTED,
    BAD_USERNAME_OR_PASSWORD,
    REPLY_PREFIX,
    REQUEST_TOPIC,
    WAIT,
    Client,
    assert_error,
    assert_ok,
    device_count,
    login,
    provision,
    provisioning_broker,
    provisioning_session,
)

# -- the ok contract ---------------------------------------------------------------------------------


async def test_ok_reply_carries_working_credentials(database_url: str) -> None:
    mac = "02:00:00:00:01:01"
    request = {
        "mac": mac,
        "firmware_version": "1.4.2",
        "sensor_types": ["temperature", "humidity"],
        "request_id": "req-0001",
    }
    advertised = {"advertised_host": "mqtt.example.test", "advertised_port": 18884}
    async with provisioning_broker(database_url, broker=advertised) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, mac, request)

        assert reply is not None
        assert reply.topic == f"provision/reply/{mac}"
        assert not reply.retain
        body = reply.json()
        device_id = assert_ok(body, "req-0001")
        assert (body["mqtt_host"], body["mqtt_port"]) == ("mqtt.example.test", 18884)

        record = await server.registry.find_credentials_by_mac(mac)
        assert record is not None
        device = record.device
        assert (device.id, device.mqtt_username) == (device_id, body["mqtt_username"])
        assert device.status is DeviceStatus.REGISTERED
        assert (device.firmware_version, device.sensor_types) == ("1.4.2", ["temperature", "humidity"])
        assert device.activated_at is None
        stored = record.password_hash
        assert stored is not None
        assert stored.startswith("$2b$04$")
        assert stored != body["mqtt_password"]
        assert body["mqtt_password"] not in stored
        assert bcrypt.checkpw(body["mqtt_password"].encode(), stored.encode())
        assert await device_count(server) == 1

        wrong = "x" * 32
        assert await asyncio.to_thread(login, port, body, password=wrong) == BAD_USERNAME_OR_PASSWORD
        assert await asyncio.to_thread(login, port, body) == ACCEPTED
        assert (await server.registry.get(device_id)).activated_at is not None


@pytest.mark.parametrize(
    "client_id",
    ["0a:1b:2c:3d:4e:5f", "0A-1B-2C-3D-4E-5F", "0a1b.2c3d.4e5f", "0A1B2C3D4E5F"],
    ids=["colons", "dashes", "cisco", "bare"],
)
async def test_every_mac_notation_is_answered_on_the_topic_it_was_written_in(
    sqlite_url: str, client_id: str
) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, client_id, {"mac": client_id})

        assert reply is not None
        assert reply.topic == f"provision/reply/{client_id}"
        device_id = assert_ok(reply.json())
        device = await server.registry.get(device_id)
        assert device.mac == "0a:1b:2c:3d:4e:5f"
        assert await asyncio.to_thread(login, port, reply.json()) == ACCEPTED


@pytest.mark.parametrize(
    ("client_id", "mac"),
    [("0a:1b:2c:3d:4e:5f-sensor-7", "0a:1b:2c:3d:4e:5f"), ("0a1b.2c3d.4e5f-x", "0a1b.2c3d.4e5f")],
)
async def test_a_suffixed_client_id_provisions_the_mac_before_the_suffix(
    sqlite_url: str, client_id: str, mac: str
) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, client_id, {"mac": mac}, REPLY_PREFIX + mac)

        assert reply is not None
        assert reply.topic == REPLY_PREFIX + mac
        device = await server.registry.get(assert_ok(reply.json()))
        assert device.mac == "0a:1b:2c:3d:4e:5f"


async def test_the_reply_goes_to_the_mac_as_the_request_wrote_it(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        written = "0A:1B:2C:3D:4E:5F"
        reply = await asyncio.to_thread(
            provision, port, "0a1b2c3d4e5f", {"mac": written}, REPLY_PREFIX + written
        )

        assert reply is not None
        assert reply.topic == REPLY_PREFIX + written
        assert_ok(reply.json())


# -- refusals about the request itself ----------------------------------------------------------------

SESSION_MAC = "02:00:00:00:02:01"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("payload", "echo"),
    [
        pytest.param(b"not json", None, id="not-json"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"[1, 2]", None, id="array"),
        pytest.param(b'"02:00:00:00:02:01"', None, id="string"),
        pytest.param(b"null", None, id="null"),
        pytest.param(b"[" * 3000, None, id="deeply-nested"),
        pytest.param(b'{"mac": "02:00:00:00:02:01"', None, id="truncated"),
        pytest.param(b'\xff\xfe{"mac": "02:00:00:00:02:01"}', None, id="invalid-utf8"),
        pytest.param(b'{"firmware_version": "1.0", "request_id": "r1"}', "r1", id="mac-missing"),
        pytest.param(b'{"mac": 20000000000201, "request_id": "r2"}', "r2", id="mac-number"),
        pytest.param(b'{"mac": null}', None, id="mac-null"),
        pytest.param(b'{"mac": ["02:00:00:00:02:01"]}', None, id="mac-list"),
        pytest.param(b'{"mac": "02:00:00:00:02:01", "firmware_version": 5}', None, id="firmware-int"),
        pytest.param(b'{"mac": "02:00:00:00:02:01", "sensor_types": "temp"}', None, id="sensors-str"),
        pytest.param(b'{"mac": "02:00:00:00:02:01", "sensor_types": [1]}', None, id="sensors-int"),
        pytest.param(b'{"mac": "02:00:00:00:02:01", "sensor_types": null}', None, id="sensors-null"),
        pytest.param(b'{"mac": "02:00:00:00:02:01", "request_id": 7}', None, id="request-id-int"),
        pytest.param(
            json.dumps({"mac": SESSION_MAC, "firmware_version": "v" * 65, "request_id": "r3"}).encode(),
            "r3",
            id="firmware-too-long",
        ),
        pytest.param(
            json.dumps({"mac": SESSION_MAC, "sensor_types": ["s"] * 33}).encode(), None, id="too-many-sensors"
        ),
        pytest.param(
            json.dumps({"mac": SESSION_MAC, "request_id": "r" * 129}).encode(), None, id="request-id-too-long"
        ),
    ],
)
async def test_malformed_requests_get_invalid_payload_on_the_sessions_own_topic(
    sqlite_url: str, payload: bytes, echo: str | None
) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, SESSION_MAC, payload)

        body = assert_error(reply, "INVALID_PAYLOAD", topic=REPLY_PREFIX + SESSION_MAC)
        assert body.get("request_id") == echo
        assert await device_count(server) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"firmware_version": "1.0\x00"}, id="nul-in-firmware"),
        pytest.param({"firmware_version": "1.0\x1b[2J"}, id="escape-in-firmware"),
        pytest.param({"sensor_types": ["temp\x00"]}, id="nul-in-sensor"),
        pytest.param({"sensor_types": ["a\x07b"]}, id="bell-in-sensor"),
    ],
)
async def test_control_characters_in_stored_fields_are_invalid_payload_on_every_database(
    database_url: str, fields: dict[str, Any]
) -> None:
    # PostgreSQL cannot store NUL in text: without this check the device got INTERNAL, SQLite ok.
    async with provisioning_broker(database_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, SESSION_MAC, {"mac": SESSION_MAC} | fields)

        assert_error(reply, "INVALID_PAYLOAD", topic=REPLY_PREFIX + SESSION_MAC)
        assert await device_count(server) == 0


async def test_an_invalid_request_id_is_not_echoed(sqlite_url: str) -> None:
    # A lone surrogate is not text: echoing it would put an unpaired \\udfff escape in the reply.
    payload = b'{"mac": "02:00:00:00:02:01", "request_id": "\\udfff"}'
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, SESSION_MAC, payload)

        body = assert_error(reply, "INVALID_PAYLOAD", topic=REPLY_PREFIX + SESSION_MAC)
        assert "request_id" not in body
        assert reply is not None
        assert b"\\ud" not in reply.payload


@pytest.mark.slow
@pytest.mark.parametrize(
    "mac",
    [
        "zz:zz:zz:zz:zz:zz",
        "02:00:00:00:02",
        "02:00:00:00:02:01:ff",
        "02:00-00:00:02:01",
        "02:00:00:00:02:0+",
        "02:00:00:00:02:#",
        "02/00/00/00/02/01",
        "02:00:00:00:02:01\x00",
        " 02:00:00:00:02:01",
        "",
        "m" * 64,
    ],
)
async def test_an_unparseable_mac_gets_invalid_mac_on_the_sessions_own_topic(
    sqlite_url: str, mac: str
) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, SESSION_MAC, {"mac": mac, "request_id": "bad-mac"})

        body = assert_error(reply, "INVALID_MAC", topic=REPLY_PREFIX + SESSION_MAC)
        assert body["request_id"] == "bad-mac"
        assert await device_count(server) == 0


async def test_a_request_for_another_mac_gets_mac_mismatch_on_the_sessions_own_topic(sqlite_url: str) -> None:
    victim = "02:00:00:00:02:99"
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        reply = await asyncio.to_thread(provision, port, SESSION_MAC, {"mac": victim, "request_id": "m"})

        body = assert_error(reply, "MAC_MISMATCH", topic=REPLY_PREFIX + SESSION_MAC)
        assert body["request_id"] == "m"
        assert await device_count(server) == 0
        assert await server.registry.find_by_mac(victim) is None


async def test_a_suffixed_session_hears_about_its_own_mistakes_on_its_macs_topic(sqlite_url: str) -> None:
    async with provisioning_broker(sqlite_url) as server:
        port = server.settings.broker.port
        own = REPLY_PREFIX + SESSION_MAC
        reply = await asyncio.to_thread(provision, port, f"{SESSION_MAC}-probe", b"{oops", own)

        assert_error(reply, "INVALID_PAYLOAD", topic=own)


async def test_payload_size_limit_is_inclusive(sqlite_url: str) -> None:
    limit = 256

    def padded(size: int) -> bytes:
        skeleton = json.dumps({"mac": SESSION_MAC, "pad": ""}).encode()
        payload = json.dumps({"mac": SESSION_MAC, "pad": "p" * (size - len(skeleton))}).encode()
        assert len(payload) == size
        return payload

    async with provisioning_broker(sqlite_url, max_payload_bytes=limit) as server:
        port = server.settings.broker.port
        with_limit = await asyncio.to_thread(provisioning_session, port, SESSION_MAC)
        try:
            too_large = await asyncio.to_thread(with_limit.request, padded(limit + 1))
            assert_error(too_large, "PAYLOAD_TOO_LARGE", topic=REPLY_PREFIX + SESSION_MAC)
            huge = await asyncio.to_thread(with_limit.request, b"x" * 60_000)
            assert_error(huge, "PAYLOAD_TOO_LARGE", topic=REPLY_PREFIX + SESSION_MAC)
            assert await device_count(server) == 0

            exact = await asyncio.to_thread(with_limit.request, padded(limit))
            assert exact is not None
            assert_ok(exact.json())
        finally:
            await asyncio.to_thread(with_limit.close)


# -- races and failures -------------------------------------------------------------------------------


def race(port: int, mac: str, sessions: int) -> list[Client]:
    """``sessions`` sessions for one MAC (suffixed client ids) fire one request each at once."""
    clients: list[Client] = []
    try:
        clients.extend(provisioning_session(port, f"{mac}-{i}", REPLY_PREFIX + mac) for i in range(sessions))
        for client in clients:
            client.publish(REQUEST_TOPIC, {"mac": mac, "request_id": client.client_id}, wait=False)
        for client in clients:
            client.next_reply(0)
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


@pytest.mark.slow
async def test_concurrent_requests_for_one_mac_yield_exactly_one_password(database_url: str) -> None:
    mac = "02:00:00:00:03:01"
    async with provisioning_broker(database_url, mac_burst=100) as server:
        port = server.settings.broker.port
        clients = await asyncio.to_thread(race, port, mac, 50)
        try:
            replies = [client.replies() for client in clients]
        finally:
            for client in clients:
                await asyncio.to_thread(client.close)

        # Every session got exactly its own reply, never another session's (same MAC, same topic).
        assert [len(r) for r in replies] == [1] * 50
        bodies = [r[0].json() for r in replies]
        assert all(r[0].topic == REPLY_PREFIX + mac for r in replies)
        assert [b["request_id"] for b in bodies] == [c.client_id for c in clients]
        oks = [b for b in bodies if b["status"] == "ok"]
        assert len(oks) == 1
        refusals = [b for b in bodies if b["status"] != "ok"]
        assert {(b["status"], b["error_code"]) for b in refusals} == {("error", "RATE_LIMITED")}
        assert all(isinstance(b["retry_after"], int) and b["retry_after"] >= 1 for b in refusals)
        assert await device_count(server) == 1
        assert await asyncio.to_thread(login, port, oks[0]) == ACCEPTED


@pytest.mark.parametrize("fault", ["returns-false", "raises"])
async def test_credentials_lost_after_the_commit_can_be_asked_for_again(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    mac = "02:00:00:00:04:01"
    async with provisioning_broker(sqlite_url, reissue_cooldown=0) as server:
        port = server.settings.broker.port
        deliver = server.broker.deliver
        lost = asyncio.Event()

        async def crash_once(client_id: str, topic: str, payload: bytes) -> bool:
            if lost.is_set():
                return await deliver(client_id, topic, payload)
            lost.set()
            if fault == "raises":
                raise ConnectionResetError("injected: connection lost before the reply")
            return False

        monkeypatch.setattr(server.broker, "deliver", crash_once)
        session = await asyncio.to_thread(provisioning_session, port, mac)
        try:
            await asyncio.to_thread(session.publish, REQUEST_TOPIC, {"mac": mac})
            await asyncio.wait_for(lost.wait(), WAIT)

            record = await server.registry.find_credentials_by_mac(mac)
            assert record is not None
            assert record.password_hash is not None
            assert record.device.status is DeviceStatus.REGISTERED
            assert session.replies() == []

            again = await asyncio.to_thread(session.request, {"mac": mac})
        finally:
            await asyncio.to_thread(session.close)

        assert again is not None
        body = again.json()
        assert assert_ok(body) == record.device.id
        assert await device_count(server) == 1
        assert await asyncio.to_thread(login, port, body) == ACCEPTED


# -- property: whatever a provisioning session publishes, it gets one reply --------------------------

PROPERTY_MAX_BYTES = 512
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REQUEST_ERRORS = {"INVALID_PAYLOAD", "INVALID_MAC", "MAC_MISMATCH", "PAYLOAD_TOO_LARGE"}


def written_mac(raw: bytes, notation: int, upper: bool) -> str:
    """Six bytes in one of the four accepted notations."""
    digits = raw.hex().upper() if upper else raw.hex()
    pairs = [digits[i : i + 2] for i in range(0, 12, 2)]
    return [":".join(pairs), "-".join(pairs), ".".join(digits[i : i + 4] for i in range(0, 12, 4)), digits][
        notation
    ]


def fits(value: object, limit: int) -> bool | None:
    """Whether a stored text field is acceptable; None where whitespace rules could disagree."""
    if not isinstance(value, str):
        return False
    # Python's str.strip removes a superset of what pydantic strips: between the two, undecided.
    core = value.strip()
    if len(core) > limit or CONTROL.search(core):
        return False
    if len(value) <= limit and not CONTROL.search(value):
        return True
    return None


def expected_valid(payload: bytes, session_mac: str) -> bool | None:
    """Does the contract call this a valid request for ``session_mac``? (None: undecided.)"""
    if len(payload) > PROPERTY_MAX_BYTES:
        return False
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("mac"), str):
        return False
    try:
        if parse_device_mac(data["mac"]) != session_mac:
            return False
    except InvalidMacError:
        return False
    verdicts: list[bool | None] = [True]
    if data.get("firmware_version") is not None:
        verdicts.append(fits(data["firmware_version"], 64))
    if "sensor_types" in data:
        sensors = data["sensor_types"]
        if not isinstance(sensors, list) or len(sensors) > 32:
            return False
        verdicts.extend(fits(s, 64) for s in sensors)
    rid = data.get("request_id")
    if rid is not None and not (isinstance(rid, str) and len(rid) <= 128):
        return False
    if False in verdicts:
        return False
    return None if None in verdicts else True


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["mac", "firmware_version", "sensor_types", "request_id"]) | st.text(
    max_size=10
)
evil_macs = st.sampled_from(["+", "#", "/", "\x00"]).flatmap(
    lambda bad: st.tuples(st.text(max_size=17), st.text(max_size=17)).map(lambda t: t[0] + bad + t[1])
) | st.sampled_from(["02:00:00:00:00:0+", "02:00:00:00:00:#", "02/00/00/00/00/01", "020000000001\x00"])
sensor_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=20)


@st.composite
def attempts(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(client id, MAC part of it, payload): anything from noise to valid requests."""
    raw = draw(st.binary(min_size=6, max_size=6))
    head = written_mac(raw, draw(st.integers(0, 3)), draw(st.booleans()))
    suffix = draw(
        st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=8)
    )
    client_id = head if suffix is None else f"{head}-{suffix}"
    request: dict[str, Any] = {"mac": written_mac(raw, draw(st.integers(0, 3)), draw(st.booleans()))}
    if draw(st.booleans()):
        request["firmware_version"] = draw(st.text(alphabet="0123456789.-abcrv", max_size=20))
    if draw(st.booleans()):
        request["sensor_types"] = draw(st.lists(sensor_names, max_size=5))
    if draw(st.booleans()):
        request["request_id"] = draw(st.text(max_size=40))
    kinds = ["binary", "object", "wrong-type", "huge", "evil-mac", "other-mac", "valid", "valid"]
    kind = draw(st.sampled_from(kinds))
    payload: Any
    if kind == "binary":
        return client_id, head, draw(st.binary(max_size=PROPERTY_MAX_BYTES + 64))
    if kind == "object":
        payload = draw(st.dictionaries(field_names, json_values, max_size=6))
    elif kind == "wrong-type":
        field = draw(st.sampled_from(["mac", "firmware_version", "sensor_types", "request_id"]))
        payload = request | {field: draw(json_values)}
    elif kind == "huge":
        field = draw(st.sampled_from(["firmware_version", "request_id", "padding", "mac"]))
        payload = request | {field: "h" * draw(st.integers(60, 4 * PROPERTY_MAX_BYTES))}
    elif kind == "evil-mac":
        payload = request | {"mac": draw(evil_macs)}
    elif kind == "other-mac":
        other = draw(st.binary(min_size=6, max_size=6).filter(lambda b: b != raw))
        payload = request | {"mac": written_mac(other, draw(st.integers(0, 3)), upper=False)}
    else:
        payload = request
    return client_id, head, json.dumps(payload, ensure_ascii=draw(st.booleans())).encode()


@pytest.mark.slow
async def test_every_publish_to_provision_request_gets_exactly_one_fitting_reply(sqlite_url: str) -> None:
    options: dict[str, Any] = {
        "max_payload_bytes": PROPERTY_MAX_BYTES,
        # A MAC seen before is refused by the cooldown for the whole run, never re-issued.
        "reissue_cooldown": 3600,
        "mac_burst": 10_000,
        "address_burst": 100_000,
    }
    async with provisioning_broker(sqlite_url, **options) as server:
        port = server.settings.broker.port
        loop = asyncio.get_running_loop()
        enrolled: set[str] = set()
        checked = threading.Event()

        def count() -> int:
            return asyncio.run_coroutine_threadsafe(device_count(server), loop).result(WAIT)

        @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(attempts())
        def publish_anything(attempt: tuple[str, str, bytes]) -> None:
            client_id, head, payload = attempt
            session_mac, own_topic = parse_mac(head), REPLY_PREFIX + head
            before = count()
            with provisioning_session(port, client_id, own_topic) as session:
                reply = session.request(payload)
            assert reply is not None, f"no reply to {payload!r}"
            body = reply.json()
            after = count()
            valid = expected_valid(payload, session_mac)
            if body["status"] == "ok":
                assert valid is not False, f"ok for an invalid request {payload!r}"
                assert session_mac not in enrolled
                assert after == before + 1
                request = json.loads(payload)
                assert reply.topic == REPLY_PREFIX + request["mac"]
                assert_ok(body, request.get("request_id"))
                enrolled.add(session_mac)
            else:
                assert body["status"] == "error", body
                assert after == before
                if valid is True:  # only a MAC enrolled earlier in this run is refused
                    assert session_mac in enrolled, f"valid request {payload!r} refused: {body}"
                    assert body["error_code"] == "RATE_LIMITED", body
                elif valid is False:
                    assert body["error_code"] in REQUEST_ERRORS, body
                    assert reply.topic == own_topic
                else:
                    assert body["error_code"] in REQUEST_ERRORS | {"RATE_LIMITED"}, body
            checked.set()

        await asyncio.to_thread(publish_anything)
        assert checked.is_set()
        assert await device_count(server) == len(enrolled)
