"""``mqttprov authd`` as a command: configuration errors, a taken port, secrets masked, clean stops,
and HTTPS with client certificates (mutual TLS)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.http.authd import AuthdServer
from tests.authd_support import SECRET, authd_process, authd_settings, migrate, write_authd_config
from tests.helpers import free_port, run_mqttprov, self_signed_cert

# slow, the whole file: runs mqttprov authd processes.
pytestmark = pytest.mark.slow


def test_config_show_masks_the_shared_secret(tmp_path: Path, sqlite_url: str) -> None:
    config = write_authd_config(tmp_path / "mqttprov.toml", sqlite_url, free_port())
    done = run_mqttprov("config", "show", "--json", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout
    assert '"shared_secret": "***"' in done.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"contracts": []}, "enable at least one contract"),
        ({"contracts": ["mosquitto"]}, "authd.contracts"),
        ({"tls_cert": "/nonexistent.pem"}, "tls_cert and tls_key go together"),
        ({"max_concurrent": 0}, "authd.max_concurrent"),
    ],
)
def test_bad_authd_settings_stop_the_command_with_one_line(
    tmp_path: Path, sqlite_url: str, extra: dict[str, Any], message: str
) -> None:
    config = write_authd_config(tmp_path / "mqttprov.toml", sqlite_url, free_port(), **extra)
    done = run_mqttprov("authd", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, sqlite_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_authd_config(tmp_path / "mqttprov.toml", sqlite_url, port)
        done = run_mqttprov("authd", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    # One line for the error, the last one (INFO lines such as the event loop's may come before it).
    (line,) = [line for line in done.stderr.splitlines() if "address already in use" in line]
    assert line.startswith(f"error: authd cannot listen on 127.0.0.1:{port}: ")
    assert done.stderr.strip().splitlines()[-1] == line


async def test_sigterm_stops_authd_cleanly(tmp_path: Path, sqlite_url: str) -> None:
    await migrate(sqlite_url)
    port = free_port()
    config = write_authd_config(tmp_path / "mqttprov.toml", sqlite_url, port, shared_secret="")
    with authd_process(config, port, tmp_path):  # asserts exit code 0 after SIGTERM
        pass
    log = (tmp_path / f"authd-{port}.log").read_text()
    assert "authd.shared_secret is not set: authd answers on loopback only" in log
    assert "received SIGTERM, shutting down" in log
    assert "authd stopped" in log


async def test_mutual_tls_admits_only_brokers_with_a_client_certificate(
    sqlite_url: str, tmp_path: Path
) -> None:
    await migrate(sqlite_url)
    cert, key = self_signed_cert(tmp_path)
    settings = authd_settings(
        sqlite_url, shared_secret=None, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(cert)
    )
    login = {
        "username": "device_0123456789ab",
        "password": "x",
        "vhost": "/",
        "client_id": "device_0123456789ab",
    }
    async with AuthdServer(settings) as server, aiohttp.ClientSession() as session:
        assert server.url.startswith("https://")
        broker = ssl.create_default_context(cafile=str(cert))
        broker.load_cert_chain(cert, key)
        async with session.post(server.url + "/rabbitmq/user", data=login, ssl=broker) as answer:
            assert answer.status == 200
            assert await answer.text() == "deny"  # reached the contract: an unknown device
        stranger = ssl.create_default_context(cafile=str(cert))  # trusts authd, has no certificate
        with pytest.raises(aiohttp.ClientError):
            async with session.post(server.url + "/rabbitmq/user", data=login, ssl=stranger) as answer:
                await answer.text()
