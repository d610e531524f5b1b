"""The device side of the provisioning contract: a small blocking paho-mqtt client.

One attempt is one MQTT session: connect with the MAC as client id, subscribe to
``provision/reply/<mac>``, publish the request, wait for the reply carrying our ``request_id``,
disconnect. ``pending``, ``RATE_LIMITED`` and ``UNAVAILABLE`` (the broker could not decide now,
e.g. its database is down) replies are asked again after the broker's ``retry_after``; any other
refusal ends the call. Every wait is a :class:`threading.Event` wait:
bounded, and the retry pause ends early when the caller's ``stop`` event is set.
"""

from __future__ import annotations

import enum
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, TypeAdapter, ValidationError

from provisioning.contract import (
    REQUEST_TOPIC,
    ErrorCode,
    ErrorReply,
    OkReply,
    PendingReply,
    ProvisionRequest,
    Reply,
    reply_topic,
)
from provisioning.errors import InvalidMacError, ProvisioningError
from provisioning.mac import parse_mac

logger = logging.getLogger(__name__)

#: No single retry pause is longer than this, whatever the broker asks for.
MAX_RETRY_WAIT = 60.0
#: Default bound on a whole :func:`provision` call, retries included.
DEFAULT_DEADLINE = 300.0
_KEEPALIVE = 30

_REPLY: TypeAdapter[Reply] = TypeAdapter(Annotated[Reply, Field(discriminator="status")])
#: Refusals that mean "not now": asked again after the broker's ``retry_after``.
RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE})

#: Called before each retry pause with the reason (``pending`` or an error code) and the pause.
RetryCallback = Callable[[str, float], None]


class ClientErrorCode(enum.StrEnum):
    """Failures seen on the device side, next to the broker's :class:`ErrorCode` refusals."""

    CONNECTION_FAILED = "CONNECTION_FAILED"
    CONNECT_REFUSED = "CONNECT_REFUSED"
    CONNECTION_LOST = "CONNECTION_LOST"
    SUBSCRIBE_REFUSED = "SUBSCRIBE_REFUSED"
    TIMEOUT = "TIMEOUT"
    INVALID_REPLY = "INVALID_REPLY"
    PENDING = "PENDING"
    CANCELLED = "CANCELLED"


class ProvisioningClientError(ProvisioningError):
    """Provisioning did not yield credentials; ``error_code`` says why, ``str()`` is one line."""

    def __init__(self, error_code: str, detail: str) -> None:
        super().__init__(f"{error_code}: {detail}")
        self.error_code = error_code
        self.detail = detail


@dataclass(frozen=True)
class Credentials:
    """The fields of an ``ok`` reply: what the device logs in with from now on."""

    device_id: uuid.UUID
    mqtt_username: str
    mqtt_password: str = field(repr=False)
    mqtt_client_id: str
    mqtt_host: str
    mqtt_port: int
    topic_prefix: str

    @classmethod
    def from_reply(cls, reply: OkReply) -> Credentials:
        """The credentials an ``ok`` reply carries."""
        return cls(
            device_id=reply.device_id,
            mqtt_username=reply.mqtt_username,
            mqtt_password=reply.mqtt_password,
            mqtt_client_id=reply.mqtt_client_id,
            mqtt_host=reply.mqtt_host,
            mqtt_port=reply.mqtt_port,
            topic_prefix=reply.topic_prefix,
        )

    def as_dict(self, *, include_password: bool = True) -> dict[str, Any]:
        """Plain JSON-ready data; without ``include_password`` the password is left out."""
        data: dict[str, Any] = {
            "device_id": str(self.device_id),
            "mqtt_username": self.mqtt_username,
            "mqtt_password": self.mqtt_password,
            "mqtt_client_id": self.mqtt_client_id,
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self.mqtt_port,
            "topic_prefix": self.topic_prefix,
        }
        if not include_password:
            del data["mqtt_password"]
        return data


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    client_id: str
    username: str | None
    password: str | None = field(repr=False)
    tls: ssl.SSLContext | None


def provision(
    host: str,
    port: int,
    mac: str,
    *,
    client_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
    firmware_version: str | None = None,
    sensor_types: Iterable[str] = (),
    timeout: float = 10.0,
    max_attempts: int = 5,
    tls: ssl.SSLContext | None = None,
    deadline: float = DEFAULT_DEADLINE,
    on_retry: RetryCallback | None = None,
    stop: threading.Event | None = None,
) -> Credentials:
    """Ask the broker at ``host:port`` for credentials for ``mac``; block until they arrive.

    ``timeout`` bounds one attempt (connect, subscribe, reply), ``deadline`` the whole call;
    ``max_attempts`` counts requests. Raises :class:`ProvisioningClientError`.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    try:
        parse_mac(mac)
    except InvalidMacError as exc:
        raise ProvisioningClientError(ErrorCode.INVALID_MAC, str(exc)) from exc
    try:
        request = ProvisionRequest(
            mac=mac, firmware_version=firmware_version, sensor_types=list(sensor_types)
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProvisioningClientError(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']}") from exc
    target = _Target(host, port, client_id or mac, username, password, tls)
    stopped = stop or threading.Event()
    give_up_at = time.monotonic() + deadline
    last: PendingReply | ErrorReply | None = None
    for attempt in range(1, max_attempts + 1):
        budget = min(timeout, give_up_at - time.monotonic())
        if budget <= 0:
            break
        reply = _attempt(target, request.model_copy(update={"request_id": uuid.uuid4().hex}), budget)
        if isinstance(reply, OkReply):
            return Credentials.from_reply(reply)
        if isinstance(reply, ErrorReply) and reply.error_code not in RETRYABLE:
            raise ProvisioningClientError(reply.error_code, reply.detail)
        last = reply
        # The broker's retry_after is the floor; our own backoff grows while it keeps saying no.
        pause = min(MAX_RETRY_WAIT, max(float(reply.retry_after or 0), 2.0 ** (attempt - 1)))
        if attempt == max_attempts or time.monotonic() + pause >= give_up_at:
            break
        reason = "pending" if isinstance(reply, PendingReply) else reply.error_code.value
        logger.debug("provisioning %s: %s; asking again in %.0f s", mac, reason, pause)
        if on_retry is not None:
            on_retry(reason, pause)
        if stopped.wait(pause):
            raise ProvisioningClientError(ClientErrorCode.CANCELLED, "provisioning was cancelled")
    raise _gave_up(last, mac)


def _gave_up(last: PendingReply | ErrorReply | None, mac: str) -> ProvisioningClientError:
    if isinstance(last, ErrorReply):
        return ProvisioningClientError(last.error_code, f"{last.detail} (gave up asking)")
    if isinstance(last, PendingReply):
        return ProvisioningClientError(
            ClientErrorCode.PENDING, f"{mac} is still waiting for an operator's approval (gave up asking)"
        )
    return ProvisioningClientError(ClientErrorCode.TIMEOUT, "the provisioning deadline passed")


def _attempt(target: _Target, request: ProvisionRequest, budget: float) -> Reply:
    """One MQTT session: connect, subscribe, publish, wait for our reply, disconnect."""
    ends_at = time.monotonic() + budget
    topic = reply_topic(request.mac)
    exchange = _Exchange(topic, request.request_id or "", budget)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=target.client_id,
        clean_session=True,
        reconnect_on_failure=False,
    )
    client.on_connect = exchange.on_connect
    client.on_subscribe = exchange.on_subscribe
    client.on_message = exchange.on_message
    client.on_disconnect = exchange.on_disconnect
    client.connect_timeout = max(budget, 0.1)
    if target.username is not None:
        client.username_pw_set(target.username, target.password)
    if target.tls is not None:
        client.tls_set_context(target.tls)
    where = f"{target.host}:{target.port}"
    try:
        client.connect(target.host, target.port, keepalive=_KEEPALIVE)
    except (OSError, ValueError) as exc:
        raise ProvisioningClientError(
            ClientErrorCode.CONNECTION_FAILED, f"cannot connect to {where}: {_reason(exc)}"
        ) from exc
    client.loop_start()
    try:
        exchange.wait(exchange.connected, ends_at, f"no CONNACK from {where}")
        if exchange.connack is None:
            raise ProvisioningClientError(
                ClientErrorCode.CONNECTION_LOST, f"{where} closed the connection before its CONNACK"
            )
        if exchange.connack.is_failure:
            raise ProvisioningClientError(
                ClientErrorCode.CONNECT_REFUSED,
                f"{where} refused the connection ({exchange.connack}): check the provisioning secret or key",
            )
        client.subscribe(topic, qos=1)
        exchange.wait(exchange.subscribed, ends_at, f"no SUBACK for {topic}")
        if not exchange.suback or any(code.is_failure for code in exchange.suback):
            raise ProvisioningClientError(ClientErrorCode.SUBSCRIBE_REFUSED, f"the broker refused {topic}")
        client.publish(REQUEST_TOPIC, request.model_dump_json(exclude_none=True), qos=1)
        exchange.wait(exchange.answered, ends_at, f"no reply on {topic}")
        return exchange.result()
    finally:
        client.disconnect()
        client.loop_stop()


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


class _Exchange:
    """What one session has seen; written by paho's network thread, read after an Event fires."""

    def __init__(self, topic: str, request_id: str, budget: float) -> None:
        self.topic = topic
        self.budget = budget
        self.request_id = request_id
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.answered = threading.Event()
        self.connack: ReasonCode | None = None
        self.suback: list[ReasonCode] = []
        self.reply: Reply | None = None
        self.invalid: str | None = None
        self.lost = False

    def wait(self, event: threading.Event, ends_at: float, what: str) -> None:
        """Wait for ``event``; TIMEOUT when the attempt's time is up, CONNECTION_LOST if dropped."""
        left = ends_at - time.monotonic()
        if not event.wait(max(left, 0.0)):
            raise ProvisioningClientError(ClientErrorCode.TIMEOUT, f"{what} within {self.budget:.3g} s")
        if self.lost and event is not self.connected and self.reply is None and self.invalid is None:
            raise ProvisioningClientError(ClientErrorCode.CONNECTION_LOST, f"the connection closed: {what}")

    def result(self) -> Reply:
        if self.reply is not None:
            return self.reply
        raise ProvisioningClientError(ClientErrorCode.INVALID_REPLY, self.invalid or "no reply")

    # -- paho callbacks (network thread): record and signal, never raise ------------------------

    def on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.connack = reason_code
        self.connected.set()

    def on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self.suback = list(reason_codes)
        self.subscribed.set()

    def on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self.topic or self.answered.is_set():
            return
        try:
            data = json.loads(message.payload)
        except (ValueError, RecursionError):
            logger.debug("ignored a reply on %s that is not JSON", self.topic)
            return
        if not isinstance(data, dict):
            return
        # None: the broker could not read our request_id, and ours is the only request in flight.
        if data.get("request_id") not in (None, self.request_id):
            return
        try:
            self.reply = _REPLY.validate_python(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "reply"
            self.invalid = f"the broker's reply does not follow the contract: {where}: {first['msg']}"
        self.answered.set()

    def on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        _reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self.lost = True
        # Wake whoever waits: they see ``lost`` and report it.
        for event in (self.connected, self.subscribed, self.answered):
            event.set()
