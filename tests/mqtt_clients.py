"""Blocking MQTT clients for the end-to-end provisioning tests, the broker they talk to, and
checks of the replies' contract.

The broker runs on the test's event loop, so every function here that talks MQTT must be
called through ``asyncio.to_thread`` (calling one on the loop would deadlock until its timeout).
paho-mqtt runs its network loop in a thread of its own; results come back through
``threading`` events and conditions with timeouts, never through sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.embedded import BrokerServer
from config import Settings
from tests.helpers import broker_settings, connack_code

HOST = "127.0.0.1"
#: Upper bound for anything that should happen (a reply, a SUBACK, a disconnect).
WAIT = 10.0
REQUEST_TOPIC = "provision/request"
REPLY_PREFIX = "provision/reply/"

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3) and the SUBACK failure code (§3.9.3).
ACCEPTED = 0
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORIZED = 5
SUBACK_FAILURE = 0x80

# paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back by name.
_CONNACK_BY_NAME = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}


def provisioning_settings(
    database_url: str,
    *,
    broker: Mapping[str, Any] | None = None,
    acl: Mapping[str, Any] | None = None,
    **options: Any,
) -> Settings:
    """Settings for a private test broker (cheap bcrypt, port 0) with these ``[provisioning]`` keys."""
    base = broker_settings(database_url, **(broker or {}))
    return Settings.model_validate(base.model_dump() | {"provisioning": options, "acl": dict(acl or {})})


@asynccontextmanager
async def provisioning_broker(
    database_url: str,
    *,
    broker: Mapping[str, Any] | None = None,
    acl: Mapping[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[BrokerServer]:
    """A running broker on ``database_url`` with these provisioning options; stopped afterwards."""
    settings = provisioning_settings(database_url, broker=broker, acl=acl, **options)
    async with BrokerServer(settings) as server:
        yield server


@dataclass(frozen=True)
class Received:
    """One PUBLISH a client received."""

    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object (fails the test if it is anything else)."""
        data = json.loads(self.payload)
        assert isinstance(data, dict), data
        return data


class Client:
    """A paho-mqtt 2.x client (MQTT 3.1.1) that records everything it receives.

    Never reconnects on its own: a test that sees a disconnect must see exactly that.
    """

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.port = port
        self.client_id = client_id
        self.messages: list[Received] = []
        self.connack: int | None = None
        self.disconnected = threading.Event()
        self._connected = threading.Event()
        self._changed = threading.Condition()
        self._subacks: dict[int, list[int]] = {}
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        self._started = False

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        self.connack = _CONNACK_BY_NAME.get(rc.getName(), 255)
        self._connected.set()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list[Any], _p: object) -> None:
        with self._changed:
            self._subacks[mid] = [int(code.value) for code in codes]
            self._changed.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain)))
            self._changed.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        self.disconnected.set()
        self._connected.set()  # a refused CONNECT must not leave connect() waiting

    # -- blocking API (test threads) --------------------------------------------------------------

    def connect(self, timeout: float = WAIT) -> int:
        """Connect and return the CONNACK code (0 when accepted)."""
        self._client.connect(HOST, self.port, keepalive=30)
        self._client.loop_start()
        self._started = True
        if not self._connected.wait(timeout):
            raise AssertionError(f"no CONNACK for {self.client_id!r} within {timeout}s")
        if self.connack is None:
            raise AssertionError(f"{self.client_id!r} was disconnected before its CONNACK")
        return self.connack

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = WAIT) -> int:
        """Subscribe and return the SUBACK code (the granted QoS, or 0x80 when refused)."""
        result, mid = self._client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        assert mid is not None
        with self._changed:
            if not self._changed.wait_for(lambda: mid in self._subacks, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout}s")
            (code,) = self._subacks[mid]
        return code

    def publish(
        self,
        topic: str,
        payload: bytes | Mapping[str, Any],
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
    ) -> None:
        """Publish (a mapping as JSON); with QoS 1 and ``wait``, until the broker's PUBACK."""
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self._client.publish(topic, raw, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"could not publish to {topic!r}: {info.rc}"
        if qos and wait:
            info.wait_for_publish(WAIT)
            assert info.is_published(), f"no PUBACK for {topic!r} within {WAIT}s"

    def replies(self, after: int = 0) -> list[Received]:
        """The messages on ``provision/reply/...`` received so far (from index ``after`` on)."""
        with self._changed:
            return [m for m in self.messages[after:] if m.topic.startswith(REPLY_PREFIX)]

    def next_reply(self, after: int, timeout: float = WAIT) -> Received | None:
        """The first reply from index ``after`` on, waiting up to ``timeout``."""
        return self.wait_for(lambda m: m.topic.startswith(REPLY_PREFIX), timeout, after=after)

    def wait_for(
        self, matches: Callable[[Received], bool], timeout: float = WAIT, *, after: int = 0
    ) -> Received | None:
        """The first message from index ``after`` on that ``matches``, waiting up to ``timeout``."""

        def found() -> Received | None:
            return next((m for m in self.messages[after:] if matches(m)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None, timeout)
            return found()

    def request(self, payload: bytes | Mapping[str, Any], timeout: float = WAIT) -> Received | None:
        """Publish to ``provision/request`` and wait for the next reply, on whatever topic."""
        start = len(self.messages)
        self.publish(REQUEST_TOPIC, payload)
        return self.next_reply(start, timeout)

    def roundtrip(self, topic: str, payload: bytes, timeout: float = WAIT) -> bool:
        """Publish to a topic this client is subscribed to and wait until it comes back.

        The positive control of every "was not received" check: the broker handles one
        session's messages in order, so whatever it would have sent before is here by now.
        """
        start = len(self.messages)
        self.publish(topic, payload)
        return (
            self.wait_for(lambda m: m.topic == topic and m.payload == payload, timeout, after=start)
            is not None
        )

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            # paho 2.x closes the wake-up socket pair of loop_start() only in __del__, and our
            # callbacks make the client part of a reference cycle: close it now, not at some GC.
            self._client._reset_sockets()
            self._started = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def provisioning_session(
    port: int,
    client_id: str,
    reply_filter: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
) -> Client:
    """A connected provisioning session subscribed to its reply topic (``provision/reply/<client id>``)."""
    client = Client(port, client_id, username=username, password=password)
    try:
        code = client.connect()
        assert code == ACCEPTED, f"provisioning session {client_id!r} refused with CONNACK {code}"
        topic = reply_filter or REPLY_PREFIX + client_id
        granted = client.subscribe(topic)
        assert granted != SUBACK_FAILURE, f"{client_id!r} may not subscribe {topic!r}"
    except BaseException:
        client.close()
        raise
    return client


def provision(
    port: int,
    client_id: str,
    payload: bytes | Mapping[str, Any],
    reply_filter: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = WAIT,
) -> Received | None:
    """One whole provisioning exchange: connect, subscribe, request, wait for the reply."""
    with provisioning_session(port, client_id, reply_filter, username=username, password=password) as c:
        return c.request(payload, timeout)


def request_provisioning(
    port: int,
    client_id: str,
    payload: bytes | Mapping[str, Any],
    reply_filter: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = WAIT,
) -> dict[str, Any] | None:
    """As :func:`provision`, returning only the reply's JSON object (None when none came)."""
    reply = provision(
        port, client_id, payload, reply_filter, username=username, password=password, timeout=timeout
    )
    return None if reply is None else reply.json()


def login(port: int, creds: Mapping[str, Any], *, password: str | None = None) -> int:
    """CONNECT with the credentials of an ``ok`` reply on a raw socket; the CONNACK code."""
    return connack_code(
        HOST,
        port,
        creds["mqtt_client_id"],
        username=creds["mqtt_username"],
        password=creds["mqtt_password"] if password is None else password,
    )


def device_session(port: int, creds: Mapping[str, Any], *, subscribe: bool = True) -> Client:
    """A device logged in with an ``ok`` reply's credentials, subscribed to ``<topic_prefix>#``."""
    client = Client(
        port, creds["mqtt_client_id"], username=creds["mqtt_username"], password=creds["mqtt_password"]
    )
    try:
        code = client.connect()
        assert code == ACCEPTED, f"device {creds['mqtt_username']!r} refused with CONNACK {code}"
        if subscribe:
            granted = client.subscribe(creds["topic_prefix"] + "#")
            assert granted != SUBACK_FAILURE, "a device may not subscribe its own namespace"
    except BaseException:
        client.close()
        raise
    return client


# -- contract checks ------------------------------------------------------------------------------

OK_KEYS = {
    "status",
    "device_id",
    "mqtt_username",
    "mqtt_password",
    "mqtt_client_id",
    "mqtt_host",
    "mqtt_port",
    "topic_prefix",
}
PASSWORD = re.compile(r"[A-Za-z0-9_-]{32}")
USERNAME = re.compile(r"device_[0-9a-f]{12}")


async def device_count(server: BrokerServer) -> int:
    """How many device rows the broker's registry holds."""
    return (await server.registry.list_devices(limit=1)).total


async def enrol(server: BrokerServer, mac: str, **kw: Any) -> dict[str, Any]:
    """One provisioning exchange for ``mac`` that must end with credentials (``kw``: proof)."""
    port = server.settings.broker.port
    body = await asyncio.to_thread(request_provisioning, port, mac, {"mac": mac}, **kw)
    assert body is not None, f"no reply for {mac}"
    assert_ok(body)
    return body


def assert_ok(body: dict[str, Any], request_id: str | None = None) -> uuid.UUID:
    """Check an ``ok`` reply's shape; returns its device id."""
    assert set(body) == OK_KEYS | ({"request_id"} if request_id is not None else set()), body
    assert body["status"] == "ok"
    device_id = uuid.UUID(body["device_id"])
    assert body["mqtt_username"] == f"device_{device_id.hex[:12]}"
    assert USERNAME.fullmatch(body["mqtt_username"])
    assert PASSWORD.fullmatch(body["mqtt_password"])
    assert body["mqtt_client_id"] == body["mqtt_username"]
    assert body["topic_prefix"] == f"devices/{device_id}/"
    assert body.get("request_id") == request_id
    return device_id


def assert_error(
    reply: Received | None, code: str, *, topic: str, retry_after: bool = False
) -> dict[str, Any]:
    """Check an ``error`` reply: its code, where it was sent, and ``retry_after`` only where it applies."""
    assert reply is not None, f"no reply (expected {code})"
    assert reply.topic == topic
    assert not reply.retain
    body = reply.json()
    assert body["status"] == "error", body
    assert body["error_code"] == code, body
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert set(body) <= {"status", "error_code", "detail", "retry_after", "request_id"}, body
    if retry_after:
        assert isinstance(body["retry_after"], int)
        assert body["retry_after"] >= 1
    else:
        assert "retry_after" not in body, body
    return body
