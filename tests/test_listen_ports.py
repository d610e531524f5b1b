"""Port 0: the OS picks a free port at bind time, the servers report it and devices are told it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.embedded import BrokerServer
from broker.http.authd import AuthdServer
from config import Settings
from tests.authd_support import authd_settings, client_for, migrate
from tests.helpers import broker_settings, connack_code, self_signed_cert, tls_connack_code
from tests.mqtt_clients import enrol

NOT_AUTHORIZED = 5


async def test_a_broker_on_port_0_accepts_connections_on_the_port_it_reports(sqlite_url: str) -> None:
    settings = broker_settings(sqlite_url)
    assert settings.broker.port == 0
    async with BrokerServer(settings) as server:
        port = server.settings.broker.port
        assert port != 0
        assert [(listener.scheme, listener.port) for listener in server.listeners] == [("mqtt", port)]
        assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == NOT_AUTHORIZED


async def test_two_brokers_on_port_0_get_different_ports(tmp_path: Path) -> None:
    first = broker_settings(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    second = broker_settings(f"sqlite+aiosqlite:///{tmp_path / 'two.db'}")
    async with BrokerServer(first) as one, BrokerServer(second) as two:
        ports = {one.settings.broker.port, two.settings.broker.port}
        assert len(ports) == 2
        assert 0 not in ports
        for port in ports:
            assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == NOT_AUTHORIZED


async def test_every_listener_on_port_0_gets_a_port_of_its_own(sqlite_url: str, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    settings = broker_settings(sqlite_url, tls_port=0, tls_cert=cert, tls_key=key, ws_port=0)
    async with BrokerServer(settings) as server:
        section = server.settings.broker
        ports = [section.port, section.tls_port, section.ws_port]
        assert [listener.port for listener in server.listeners] == ports
        assert len(set(ports)) == 3
        assert 0 not in ports
        assert section.tls_port is not None
        code = await asyncio.to_thread(tls_connack_code, "127.0.0.1", section.tls_port, cert)
        assert code == NOT_AUTHORIZED


async def test_devices_are_told_the_bound_port(sqlite_url: str) -> None:
    async with BrokerServer(broker_settings(sqlite_url)) as server:
        body = await enrol(server, "02:00:00:00:50:01")
        assert body["mqtt_port"] == server.settings.broker.port != 0


async def test_an_advertised_port_still_wins_over_the_bound_one(sqlite_url: str) -> None:
    async with BrokerServer(broker_settings(sqlite_url, advertised_port=18883)) as server:
        body = await enrol(server, "02:00:00:00:50:02")
        assert body["mqtt_port"] == 18883


async def test_an_authd_on_port_0_answers_on_the_port_it_reports(sqlite_url: str) -> None:
    await migrate(sqlite_url)
    settings = authd_settings(sqlite_url)
    assert settings.authd.port == 0
    async with AuthdServer(settings) as server, client_for(server.url) as client:
        assert server.settings.authd.port != 0
        assert server.url == f"http://127.0.0.1:{server.settings.authd.port}"
        assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("key", ["port", "tls_port", "ws_port"])
def test_a_listening_port_may_be_0_but_not_negative(key: str) -> None:
    assert getattr(Settings.model_validate(broker_section(key, 0)).broker, key) == 0
    with pytest.raises(ValidationError, match=key):
        Settings.model_validate(broker_section(key, -1))


def broker_section(key: str, port: int) -> dict[str, dict[str, object]]:
    """``[broker] KEY = PORT``, with what a ``tls_port`` needs beside it (files unread here)."""
    tls: dict[str, object] = {"tls_cert": "c.pem", "tls_key": "k.pem"} if key == "tls_port" else {}
    return {"broker": {key: port} | tls}
