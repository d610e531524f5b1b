"""``mqttprov api`` as a command, and the API's TLS: a taken port is one line, HTTPS as configured."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from broker.errors import ServeError
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
