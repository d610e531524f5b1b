"""The device-side provisioning client against a real in-process broker."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.embedded import BrokerServer
from config import ProvisioningSettings
from provisioning import ProvisioningError
from provisioning.client import ClientErrorCode, Credentials, ProvisioningClientError, provision
from provisioning.contract import PROVISION_USERNAME, ErrorCode
from provisioning.keys import derive_device_key
from provisioning.registry import DeviceStatus
from tests.helpers import broker_settings, free_port

MAC = "aa:bb:cc:dd:ee:01"
FLEET_SECRET = "fleet-s3cret"
MASTER_SECRET = "factory-master-s3cret"


@asynccontextmanager
async def running(sqlite_url: str, **provisioning: Any) -> AsyncIterator[BrokerServer]:
    """A broker on a free port with these ``[provisioning]`` settings."""
    base = broker_settings(sqlite_url)
    settings = base.model_copy(update={"provisioning": ProvisioningSettings(**provisioning)})
    async with BrokerServer(settings) as server:
        yield server


async def ask(server: BrokerServer, mac: str = MAC, **options: Any) -> Credentials:
    """Run the blocking client in a thread while the broker serves on this loop."""
    address = server.settings.broker
    return await asyncio.to_thread(provision, address.host, address.port, mac, timeout=5.0, **options)


async def refused(server: BrokerServer, mac: str = MAC, **options: Any) -> ProvisioningClientError:
    """The error a provisioning attempt ends with (fails the test if it succeeds)."""
    with pytest.raises(ProvisioningClientError) as caught:
        await ask(server, mac, **options)
    return caught.value


def login_code(credentials: Credentials, password: str | None = None, timeout: float = 5.0) -> ReasonCode:
    """Log in with paho as the provisioned device; the CONNACK's reason code."""
    connacks: list[ReasonCode] = []
    connected = threading.Event()

    def on_connect(
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        code: ReasonCode,
        _p: Properties | None,
    ) -> None:
        connacks.append(code)
        connected.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=credentials.mqtt_client_id, reconnect_on_failure=False
    )
    client.on_connect = on_connect
    client.username_pw_set(credentials.mqtt_username, password or credentials.mqtt_password)
    client.connect(credentials.mqtt_host, credentials.mqtt_port)
    client.loop_start()
    try:
        assert connected.wait(timeout), "no CONNACK"
        return connacks[0]
    finally:
        client.disconnect()
        client.loop_stop()


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# -- open mode ---------------------------------------------------------------------------------


async def test_open_mode_issues_credentials_that_log_in(sqlite_url: str) -> None:
    async with running(sqlite_url) as server:
        credentials = await ask(server, firmware_version="1.4.2", sensor_types=("temp", "co2"))
        code = await asyncio.to_thread(login_code, credentials)
        device = await server.registry.resolve(MAC)
    assert code == 0
    assert credentials.mqtt_client_id == credentials.mqtt_username == device.mqtt_username
    assert credentials.device_id == device.id
    assert (credentials.mqtt_host, credentials.mqtt_port) == ("127.0.0.1", server.settings.broker.port)
    assert credentials.topic_prefix.startswith("devices/")
    assert device.status is DeviceStatus.REGISTERED
    assert device.activated_at is not None
    assert (device.firmware_version, device.sensor_types) == ("1.4.2", ["temp", "co2"])
    assert credentials.mqtt_password not in repr(credentials)
    assert credentials.mqtt_password not in str(credentials)
    assert credentials.as_dict(include_password=False).keys() == credentials.as_dict().keys() - {
        "mqtt_password"
    }


async def test_reply_topic_follows_the_mac_as_written(sqlite_url: str) -> None:
    async with running(sqlite_url) as server:
        credentials = await ask(server, "AA-BB-CC-DD-EE-02")
        device = await server.registry.resolve("aa:bb:cc:dd:ee:02")
    assert credentials.device_id == device.id


@pytest.mark.slow
async def test_rate_limited_request_is_retried_after_retry_after(sqlite_url: str) -> None:
    reasons: list[str] = []
    async with running(sqlite_url, reprovision="reissue", reissue_cooldown=1) as server:
        first = await ask(server)
        second = await ask(server, on_retry=lambda reason, _pause: reasons.append(reason))
        old_code = await asyncio.to_thread(login_code, first)
        new_code = await asyncio.to_thread(login_code, second)
    assert reasons[0] == ErrorCode.RATE_LIMITED
    assert second.device_id == first.device_id
    assert second.mqtt_password != first.mqtt_password
    assert (old_code.is_failure, new_code.is_failure) == (True, False)


# -- approval and allowlist --------------------------------------------------------------------


@pytest.mark.slow
async def test_approval_mode_waits_until_an_operator_approves(sqlite_url: str) -> None:
    asked_again = threading.Event()
    reasons: list[str] = []

    def on_retry(reason: str, _pause: float) -> None:
        reasons.append(reason)
        asked_again.set()

    async with running(sqlite_url, mode="approval", pending_retry_after=1) as server:
        enrolling = asyncio.create_task(ask(server, on_retry=on_retry))
        assert await asyncio.to_thread(asked_again.wait, 5.0)
        pending = await server.registry.resolve(MAC)
        await server.registry.approve(pending.id)
        credentials = await asyncio.wait_for(enrolling, 10.0)
        code = await asyncio.to_thread(login_code, credentials)
    assert pending.status is DeviceStatus.PENDING
    assert reasons[0] == "pending"
    assert credentials.device_id == pending.id
    assert code == 0


async def test_pending_after_the_last_attempt_is_an_error(sqlite_url: str) -> None:
    async with running(sqlite_url, mode="approval") as server:
        error = await refused(server, max_attempts=1)
    assert error.error_code == ClientErrorCode.PENDING
    assert str(error).startswith("PENDING: ")


async def test_stop_event_cuts_the_retry_pause_short(sqlite_url: str) -> None:
    stop = threading.Event()
    async with running(sqlite_url, mode="approval", pending_retry_after=60) as server:
        started = time.monotonic()
        error = await refused(server, stop=stop, on_retry=lambda _reason, _pause: stop.set())
    assert error.error_code == ClientErrorCode.CANCELLED
    assert time.monotonic() - started < 10


async def test_allowlist_refuses_unknown_macs_and_admits_added_ones(sqlite_url: str) -> None:
    async with running(sqlite_url, mode="allowlist") as server:
        error = await refused(server)
        await server.registry.add_allowed(MAC)
        credentials = await ask(server)
    assert error.error_code == ErrorCode.NOT_ALLOWED
    assert isinstance(error, ProvisioningError)
    assert error.detail == "this MAC is not on the allowlist"
    assert credentials.mqtt_username.startswith("device_")


# -- provisioning proofs -----------------------------------------------------------------------


async def test_fleet_secret_right_and_wrong(sqlite_url: str) -> None:
    async with running(sqlite_url, auth="fleet_secret", fleet_secret=FLEET_SECRET) as server:
        wrong = await refused(server, username=PROVISION_USERNAME, password="not-the-secret")
        missing = await refused(server)
        credentials = await ask(server, username=PROVISION_USERNAME, password=FLEET_SECRET)
    for error in (wrong, missing):
        assert error.error_code == ClientErrorCode.CONNECT_REFUSED
        assert "refused the connection" in str(error)
        assert FLEET_SECRET not in str(error)
    assert credentials.mqtt_username.startswith("device_")


async def test_device_key_admits_only_the_key_of_this_mac(sqlite_url: str) -> None:
    async with running(sqlite_url, auth="device_key", device_key_secret=MASTER_SECRET) as server:
        other = derive_device_key(MASTER_SECRET, "aa:bb:cc:dd:ee:99")
        wrong = await refused(server, username=PROVISION_USERNAME, password=other)
        key = derive_device_key(MASTER_SECRET, MAC)
        credentials = await ask(server, username=PROVISION_USERNAME, password=key)
        code = await asyncio.to_thread(login_code, credentials)
    assert wrong.error_code == ClientErrorCode.CONNECT_REFUSED
    assert code == 0


# -- no broker ---------------------------------------------------------------------------------


async def test_silent_server_times_out() -> None:
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(ProvisioningClientError) as caught:
            await asyncio.to_thread(provision, "127.0.0.1", port, MAC, timeout=0.5)
        elapsed = time.monotonic() - started
    assert caught.value.error_code == ClientErrorCode.TIMEOUT
    assert "no CONNACK" in str(caught.value)
    assert 0.4 < elapsed < 5


async def test_closed_port_is_a_connection_failure() -> None:
    with pytest.raises(ProvisioningClientError) as caught:
        await asyncio.to_thread(provision, "127.0.0.1", free_port(), MAC, timeout=2.0)
    assert caught.value.error_code == ClientErrorCode.CONNECTION_FAILED
    assert "Connection refused" in str(caught.value)


def test_invalid_mac_is_refused_before_connecting() -> None:
    with pytest.raises(ProvisioningClientError) as caught:
        provision("127.0.0.1", free_port(), "not-a-mac")
    assert caught.value.error_code == ErrorCode.INVALID_MAC
