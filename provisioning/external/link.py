"""One paho-mqtt 2 client driven from asyncio, for service connections to an external broker.

paho runs its network loop in a thread of its own (``loop_start``); every callback hands its
result to the event loop with ``call_soon_threadsafe`` and never touches asyncio objects
directly. Nothing here blocks the loop: connect, subscribe and publish are awaited futures
resolved by paho's callbacks, each with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from provisioning.errors import ProvisioningError

logger = logging.getLogger(__name__)

_SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}


class ExternalBrokerError(ProvisioningError):
    """The external broker refused us, is unreachable, or did not answer in time."""

    error_code = "EXTERNAL_BROKER"


@dataclass(frozen=True)
class BrokerAddress:
    """Where a service client connects: ``mqtt[s]://[username@]host[:port]``."""

    host: str
    port: int
    tls: bool
    username: str | None = None

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL; a password in it is refused (it belongs in the configuration)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ExternalBrokerError(f"invalid broker URL {url!r}: {exc}") from exc
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ExternalBrokerError(
            f"invalid broker URL {url!r}: expected mqtt://host:port or mqtts://host:port"
        )
    if parts.password is not None:
        raise ExternalBrokerError("put the password in the configuration or environment, not in the URL")
    tls, default_port = _SCHEMES[parts.scheme]
    return BrokerAddress(parts.hostname, port or default_port, tls, parts.username or None)


@dataclass(frozen=True)
class Message:
    """One PUBLISH received."""

    topic: str
    payload: bytes


class MqttLink:
    """A persistent MQTT 3.1.1 service session; paho reconnects it and we re-subscribe.

    Use as an async context manager: on entry the session is connected.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        ca_file: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.timeout = timeout
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        # An RLock: paho may call on_publish/on_subscribe inside publish()/subscribe() itself.
        self._lock = threading.RLock()
        self._pending: dict[int, asyncio.Future[list[int]]] = {}
        self._early: dict[int, list[int]] = {}
        self._filters: dict[str, int] = {}
        self._connected: asyncio.Future[str | None] | None = None
        self._started = False
        self._up = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username is not None:
            client.username_pw_set(username, password)
        if address.tls:
            client.tls_set(ca_certs=str(ca_file) if ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._client = client

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        code = 0 if not rc.is_failure else int(rc.value)
        if code == 0:
            # A reconnect starts a clean session: subscribe again to what we had.
            for topic_filter, qos in list(self._filters.items()):
                client.subscribe(topic_filter, qos)
        self._loop.call_soon_threadsafe(self._connect_result, code, str(rc))

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        self._loop.call_soon_threadsafe(self._disconnected, str(rc))

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        self._loop.call_soon_threadsafe(
            self.messages.put_nowait, Message(message.topic, bytes(message.payload))
        )

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        self._settle(mid, [0])

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list[Any], _p: object) -> None:
        self._settle(mid, [int(code.value) for code in codes])

    def _settle(self, mid: int, result: list[int]) -> None:
        with self._lock:
            future = self._pending.pop(mid, None)
            if future is None:
                self._early[mid] = result
                return
        self._loop.call_soon_threadsafe(_resolve, future, result)

    # -- loop side --------------------------------------------------------------------------------

    def _connect_result(self, code: int, reason: str) -> None:
        future = self._connected
        if future is not None and not future.done():
            future.set_result(None if code == 0 else reason)
        self._up = code == 0
        if code == 0:
            logger.info("connected to %s as %r", self.address, self.client_id)
        else:
            logger.warning("%s refused %r: %s", self.address, self.client_id, reason)

    def _disconnected(self, reason: str) -> None:
        if self._started and self._up:
            logger.warning("lost the connection to %s (%s); reconnecting", self.address, reason)
        self._up = False

    async def connect(self) -> None:
        """Connect and wait for CONNACK; :class:`ExternalBrokerError` on refusal or timeout."""
        self._connected = self._loop.create_future()
        try:
            await asyncio.to_thread(self._client.connect, self.address.host, self.address.port, 30)
        except (OSError, ssl.SSLError) as exc:
            raise ExternalBrokerError(f"cannot connect to {self.address}: {exc}") from exc
        self._client.loop_start()
        self._started = True
        try:
            refusal = await asyncio.wait_for(self._connected, self.timeout)
        except TimeoutError as exc:
            await self.close()
            raise ExternalBrokerError(f"no CONNACK from {self.address} within {self.timeout:g}s") from exc
        if refusal is not None:
            await self.close()
            raise ExternalBrokerError(f"{self.address} refused {self.client_id!r}: {refusal}")

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe (kept across reconnects); :class:`ExternalBrokerError` when refused."""
        self._filters[topic_filter] = qos
        (code,) = await self._call(
            lambda: self._client.subscribe(topic_filter, qos), f"SUBACK {topic_filter}"
        )
        if code >= 0x80:
            del self._filters[topic_filter]
            raise ExternalBrokerError(f"{self.address} refused the subscription to {topic_filter!r}")

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish; with QoS 1, return once the broker has acknowledged it."""
        if qos == 0:
            self._client.publish(topic, payload, qos=0)
            return
        await self._call(lambda: _mid(self._client.publish(topic, payload, qos=qos)), f"PUBACK {topic}")

    async def _call(self, send: Any, what: str) -> list[int]:
        future: asyncio.Future[list[int]] = self._loop.create_future()
        # Sent outside our lock: paho calls on_publish holding its own lock, and _settle then
        # takes ours; holding ours around send() would take the two in the opposite order
        # (a deadlock under concurrent publishes). An acknowledgement that wins the race lands
        # in _early.
        rc, mid = send()
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ExternalBrokerError(f"not connected to {self.address} ({mqtt.error_string(rc)})")
        with self._lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._pending[mid] = future
            else:
                future.set_result(early)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError as exc:
            with self._lock:
                self._pending.pop(mid, None)
            self._forget(mid)
            raise ExternalBrokerError(f"no {what} from {self.address} within {self.timeout:g}s") from exc

    def _forget(self, mid: int) -> None:
        # paho resends every unacknowledged QoS 1 message on each reconnect. One we have given up
        # on (and reported as failed) must not go again: a broker that ends the connection over
        # it (RabbitMQ does, for a refused PUBLISH) would see it, and end it, on every reconnect.
        # paho 2 has no public call for this; the pin (<3) keeps these two attributes.
        with self._client._out_message_mutex:
            self._client._out_messages.pop(mid, None)

    async def close(self) -> None:
        """Disconnect and stop paho's network thread."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        # paho closes the wake-up socket pair of loop_start() only in __del__: close it now.
        reset = getattr(self._client, "_reset_sockets", None)
        if reset is not None:
            reset()

    async def __aenter__(self) -> MqttLink:
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


def _mid(info: mqtt.MQTTMessageInfo) -> tuple[int, int]:
    return info.rc, info.mid


def _resolve(future: asyncio.Future[list[int]], result: list[int]) -> None:
    if not future.done():
        future.set_result(result)
