"""The broker: :class:`BrokerServer` in-process and ``mqttprov serve`` as a real process."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from broker.core import run_until_signalled
from broker.embedded import BrokerServer
from broker.errors import ServeError
from broker.logs import configure_logging
from provisioning import RegistryUnavailableError
from provisioning.registry import DeviceRegistry, DeviceStatus, create_engine
from provisioning.registry.migrate import current_revision, head_revision
from tests.helpers import (
    broker_settings,
    connack_code,
    connect_packet,
    free_port,
    free_ports,
    mqttprov_executable,
    preserved_logging,
    run_mqttprov,
    self_signed_cert,
    tls_connack_code,
    write_config,
)

STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 10.0
NOT_AUTHORIZED = 5  # CONNACK code for a CONNECT without credentials (the probes send none)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost/127.0.0.1."""
    return self_signed_cert(tmp_path)


async def ws_connack_code(host: str, port: int) -> int:
    """Send a CONNECT as one binary websocket message (subprotocol ``mqtt``); the CONNACK code."""
    async with ws_connect(f"ws://{host}:{port}/", subprotocols=[Subprotocol("mqtt")], open_timeout=5) as ws:
        assert ws.subprotocol == "mqtt"
        await ws.send(connect_packet("ws-probe"))
        reply = b""
        while len(reply) < 4:
            message = await asyncio.wait_for(ws.recv(), timeout=5)
            assert isinstance(message, bytes)
            reply += message
    assert reply[:2] == bytes([0x20, 2]), reply
    return reply[3]


# -- BrokerServer in-process -------------------------------------------------------------------


async def test_server_refuses_an_anonymous_connect_with_connack_5(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.embedded.server")
    async with BrokerServer(broker_settings(sqlite_url)) as server:
        host, port = server.settings.broker.host, server.settings.broker.port
        assert await asyncio.to_thread(connack_code, host, port, "stranger") == NOT_AUTHORIZED
    messages = [
        r.getMessage()
        for r in caplog.records
        if r.name == "broker.embedded.server" and r.levelno == logging.INFO
    ]
    assert messages == [
        f"listening for mqtt on {host}:{port}",
        f"broker started; devices are told to connect to {host}:{port}",
        "broker stopped",
    ]
    with pytest.raises(ServeError, match="not started"):
        server.registry  # noqa: B018 - the property raises once stopped
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, port)


async def test_server_migrates_the_database_on_start(database_url: str) -> None:
    async with BrokerServer(broker_settings(database_url)) as server:
        assert await current_revision(server.registry.engine) == head_revision()
        made = await server.registry.create_device("aa:bb:cc:dd:ee:01")
        page = await server.registry.list_devices()
    assert [d.id for d in page.devices] == [made.id]


async def test_server_tls_listener(sqlite_url: str, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    settings = broker_settings(sqlite_url, tls_port=0, tls_cert=cert, tls_key=key)
    async with BrokerServer(settings) as server:
        port, tls_port = server.settings.broker.port, server.settings.broker.tls_port
        assert tls_port is not None
        assert [(lst.scheme, lst.port) for lst in server.listeners] == [("mqtt", port), ("mqtts", tls_port)]
        code = await asyncio.to_thread(tls_connack_code, "127.0.0.1", tls_port, cert)
        assert code == NOT_AUTHORIZED
        assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == NOT_AUTHORIZED


async def test_server_websocket_listener(sqlite_url: str) -> None:
    async with BrokerServer(broker_settings(sqlite_url, ws_port=0)) as server:
        ws_port = server.settings.broker.ws_port
        assert ws_port is not None
        assert server.listeners[-1].scheme == "ws"
        assert server.listeners[-1].port == ws_port
        assert await ws_connack_code("127.0.0.1", ws_port) == NOT_AUTHORIZED


@pytest.mark.parametrize("broken", ["cert", "key", "garbage"])
async def test_server_bad_tls_files_are_one_line(
    sqlite_url: str, tls_files: tuple[Path, Path], tmp_path: Path, broken: str
) -> None:
    cert, key = tls_files
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n", encoding="utf-8")
    cert, key, expected = {
        "cert": (missing, key, f"broker.tls_cert: {missing}: no such file"),
        "key": (cert, missing, f"broker.tls_key: {missing}: no such file"),
        "garbage": (garbage, key, "broker.tls_cert/tls_key: cannot load certificate and key: "),
    }[broken]
    server = BrokerServer(broker_settings(sqlite_url, tls_port=0, tls_cert=cert, tls_key=key))
    with pytest.raises(ServeError) as info:
        await server.start()
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


async def test_server_port_in_use(sqlite_url: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = BrokerServer(broker_settings(sqlite_url, port=port))
        with pytest.raises(ServeError, match="address already in use") as info:
            await server.start()
    assert str(info.value).startswith("cannot start the broker: ")
    assert "\n" not in str(info.value)
    with pytest.raises(ServeError, match="not started"):
        server.broker  # noqa: B018 - the property raises when start failed


async def test_failed_start_releases_the_listeners_already_open(sqlite_url: str) -> None:
    """amqtt opens listeners one by one; when a later one fails the earlier ones must close."""
    settings_port = free_port()  # known beforehand: a failed start reports no port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        settings = broker_settings(sqlite_url, port=settings_port, ws_port=blocker.getsockname()[1])
        with pytest.raises(ServeError, match="address already in use"):
            await BrokerServer(settings).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", settings_port))  # OSError if the TCP listener leaked


async def test_server_unreachable_database_opens_no_listener(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://mqtt:s3cr3t@127.0.0.1:{free_port()}/mqttprov"
    settings = broker_settings(url, port=free_port())  # known beforehand: a failed start reports none
    with pytest.raises(RegistryUnavailableError, match=r"^database unavailable: ") as info:
        await BrokerServer(settings).start()
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", settings.broker.port)


WILDCARD_WARNING = (
    "broker.host is the wildcard '0.0.0.0' and broker.advertised_host is not set: "
    "devices will be told to connect to an address they cannot dial"
)


@pytest.mark.parametrize(("advertised", "expected"), [(None, [WILDCARD_WARNING]), ("broker.example", [])])
async def test_wildcard_host_warning(
    sqlite_url: str, caplog: pytest.LogCaptureFixture, advertised: str | None, expected: list[str]
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.embedded.server")
    settings = broker_settings(sqlite_url, host="0.0.0.0", advertised_host=advertised)
    async with BrokerServer(settings):
        pass
    # Other settings may warn too (e.g. open provisioning); only the broker.host one is ours here.
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "broker.embedded.server"
        and r.levelno == logging.WARNING
        and "broker.host" in r.getMessage()
    ]
    assert warned == expected


def test_serve_logging_drops_tracebacks_of_client_resets(capsys: pytest.CaptureFixture[str]) -> None:
    """A device dropping its TLS connection makes asyncio log a traceback; the CLI keeps it quiet."""
    asyncio_logger = logging.getLogger("asyncio")
    with preserved_logging():
        configure_logging(level=logging.INFO)
        for exc in (ConnectionResetError(104, "Connection reset by peer"), ValueError("a real bug")):
            asyncio_logger.error(
                "Unhandled exception in client_connected_cb\ntransport: <transport>", exc_info=exc
            )
    err = capsys.readouterr().err
    assert "ConnectionResetError" not in err
    assert "ValueError: a real bug" in err


class _Service:
    """The smallest service: says when it has been entered."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def __aenter__(self) -> _Service:
        self.entered.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_a_started_service_exempts_its_start_up_heap_from_collection() -> None:
    # Every full collection would walk start-up's objects again: a serving process freezes
    # them once it is up (broker.core.settle_heap), so a reconnect storm does not pay for them.
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    service, stop = _Service(), asyncio.Event()
    running = asyncio.create_task(run_until_signalled(service, stop))
    try:
        await asyncio.wait_for(service.entered.wait(), 5.0)
        assert gc.get_freeze_count() > 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 5.0)
        gc.unfreeze()  # this is the test process: leave its collector as it was


# -- mqttprov serve as a process ---------------------------------------------------------------


@dataclass
class ServeProcess:
    """A running ``mqttprov serve`` and the stderr lines read from it so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        """The log messages without time, level and logger name."""
        return [line.partition(": ")[2] for line in self.lines]

    async def read_until(self, needle: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Read stderr lines until one contains ``needle``; fail on a deadline or on exit."""
        assert self.process.stderr is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                raw = await asyncio.wait_for(self.process.stderr.readline(), deadline - loop.time())
            except TimeoutError:
                raise AssertionError(f"no {needle!r} within {timeout}s: {self.lines}") from None
            if not raw:
                raise AssertionError(f"serve ended before logging {needle!r}: {self.lines}")
            self.lines.append(raw.decode().rstrip("\n"))
            if needle in self.lines[-1]:
                return

    async def stop(self, sig: signal.Signals) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        self.process.send_signal(sig)
        _, stderr = await asyncio.wait_for(self.process.communicate(), SHUTDOWN_TIMEOUT)
        self.lines.extend(stderr.decode().splitlines())
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def serving(config: Path, cwd: Path) -> AsyncIterator[ServeProcess]:
    """``mqttprov serve --config CONFIG``, yielded once it logged that the broker started."""
    process = await asyncio.create_subprocess_exec(
        mqttprov_executable(),
        "serve",
        "--config",
        str(config),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    served = ServeProcess(process)
    try:
        await served.read_until("listening for mqtt on")
        await served.read_until("broker started")
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_runs_every_listener_until_signalled(
    tmp_path: Path, sqlite_url: str, tls_files: tuple[Path, Path], sig: signal.Signals
) -> None:
    cert, key = tls_files
    port, tls_port, ws_port = free_ports(3)
    broker: dict[str, str | int | Path] = {
        "host": "127.0.0.1",
        "port": port,
        "tls_port": tls_port,
        "tls_cert": cert,
        "tls_key": key,
        "ws_port": ws_port,
    }
    config = write_config(tmp_path / "mqttprov.toml", {"broker": broker, "database": {"url": sqlite_url}})
    async with serving(config, tmp_path) as served:
        assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == NOT_AUTHORIZED
        assert await asyncio.to_thread(tls_connack_code, "127.0.0.1", tls_port, cert) == NOT_AUTHORIZED
        assert await ws_connack_code("127.0.0.1", ws_port) == NOT_AUTHORIZED
        assert await served.stop(sig) == 0
    assert [m for m in served.messages if m.startswith("listening for ")] == [
        f"listening for mqtt on 127.0.0.1:{port}",
        f"listening for mqtts on 127.0.0.1:{tls_port}",
        f"listening for ws on 127.0.0.1:{ws_port}",
    ]
    assert f"database migrated from empty to {head_revision()}" in served.messages
    assert f"received {sig.name}, shutting down" in served.messages
    assert served.messages[-1] == "broker stopped"
    assert not any("Traceback" in line for line in served.lines), "\n".join(served.lines)


@pytest.mark.slow
def test_serve_port_in_use_exits_with_one_line(tmp_path: Path, sqlite_url: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        config = write_config(
            tmp_path / "mqttprov.toml",
            {"broker": {"host": "127.0.0.1", "port": port}, "database": {"url": sqlite_url}},
        )
        done = run_mqttprov("serve", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "address already in use" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: cannot start the broker: ")
    assert done.stderr.splitlines()[-1] == errors[0]


@pytest.mark.slow
async def test_cli_writes_while_serve_runs_on_the_same_sqlite_file(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(
        tmp_path / "mqttprov.toml",
        {"broker": {"host": "127.0.0.1", "port": free_port()}, "database": {"url": sqlite_url}},
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_mqttprov("devices", *args, "--config", str(config), cwd=tmp_path)

    async with serving(config, tmp_path) as served:
        registry = DeviceRegistry(create_engine(sqlite_url))
        try:
            retire = await registry.create_device("aa:bb:cc:00:00:01", status=DeviceStatus.REGISTERED)
            remove = await registry.create_device("aa:bb:cc:00:00:02", status=DeviceStatus.REGISTERED)
            # Two CLI processes write while this process keeps writing until both have finished.
            commands = [
                asyncio.create_task(asyncio.to_thread(cli, "decommission", str(retire.id), "--json")),
                asyncio.create_task(asyncio.to_thread(cli, "delete", remove.mac, "--yes")),
            ]
            created = 0
            while not all(task.done() for task in commands) and created < 4096:
                await registry.create_device(f"aa:bb:cc:01:{created >> 8:02x}:{created & 0xFF:02x}")
                created += 1
            decommissioned, deleted = await asyncio.gather(*commands)
            total = (await registry.list_devices()).total
            retired = await registry.get(retire.id)
            removed = await registry.find_by_mac(remove.mac)
        finally:
            await registry.close()
        assert served.process.returncode is None
        assert await served.stop(signal.SIGTERM) == 0
    for done in (decommissioned, deleted):
        assert done.returncode == 0, done.stderr
        assert "database is locked" not in done.stderr
    assert json.loads(decommissioned.stdout)["status"] == "decommissioned"
    assert deleted.stdout == f"deleted {remove.id} (aa:bb:cc:00:00:02)\n"
    assert created > 0
    assert total == 1 + created
    assert retired.status == DeviceStatus.DECOMMISSIONED
    assert removed is None
