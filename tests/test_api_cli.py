"""``mqttprov api`` as a command, and the API's TLS: a taken port is one line, HTTPS as configured."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from broker.errors import ServeError
from config import Settings
from tests.api_support import api_settings, running_api
from tests.helpers import run_mqttprov, self_signed_cert, write_config


def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, sqlite_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "mqttprov.toml",
            {"database": {"url": sqlite_url}, "api": {"host": "127.0.0.1", "port": port}},
        )
        done = run_mqttprov("api", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "address already in use" in line.lower()]
    assert line.startswith(f"error: the API cannot listen on 127.0.0.1:{port}: ")


async def test_https_with_the_configured_certificate(tmp_path: Path, sqlite_url: str) -> None:
    cert, key = self_signed_cert(tmp_path)
    settings = api_settings(sqlite_url, api={"tls_cert": str(cert), "tls_key": str(key)})
    async with running_api(settings) as api:
        assert api.server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=context) as client:
            response = await client.get(api.server.url + "/health")
        assert response.status_code == 200
        plain = api.server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient() as client:
                await client.get(plain + "/health")


async def test_an_unreadable_key_is_a_serve_error(tmp_path: Path, sqlite_url: str) -> None:
    cert, _key = self_signed_cert(tmp_path)
    settings = api_settings(sqlite_url, api={"tls_cert": str(cert), "tls_key": str(tmp_path / "none.pem")})
    with pytest.raises(ServeError, match=r"api\.tls_cert/tls_key: cannot load"):
        async with running_api(settings):
            pass


def test_serve_on_a_taken_api_port_is_one_line_naming_the_setting(tmp_path: Path, sqlite_url: str) -> None:
    # serve hosts the API by default (the suite turns it off: see conftest), on loopback.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = {
            "MQTTPROV_API__ENABLED": "true",
            "MQTTPROV_API__PORT": str(taken.getsockname()[1]),
            "MQTTPROV_BROKER__HOST": "127.0.0.1",
            "MQTTPROV_BROKER__PORT": "0",
            "MQTTPROV_DATABASE__URL": sqlite_url,
        }
        done = run_mqttprov("serve", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.stderr.splitlines()[-1] == error
    assert error.startswith("error: the API cannot listen on 127.0.0.1:")
    assert "address already in use" in error.lower()
    assert error.endswith(
        "(set another: [api] port in the config file or MQTTPROV_API__PORT; "
        "[api] enabled = false serves no API)"
    )


def test_the_api_is_on_by_default_on_loopback() -> None:
    api = Settings().api
    assert (api.enabled, api.host, api.port) == (True, "127.0.0.1", 9883)
