"""Small helpers shared by the tests: free ports, settings for a private broker, MQTT probes."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config import Settings
from tests.bench.mqtt import remaining_length


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 1883).

    Racy (another process may take it before it is used): only for a port that must be known
    before a separate process starts (``mqttprov serve``, private Mosquitto or RabbitMQ nodes), or
    where nothing is meant to listen. An in-process server binds port 0 and reports the port.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != 1883:
            return port


def broker_settings(database_url: str, **broker: Any) -> Settings:
    """Settings for a private broker on loopback and cheap bcrypt.

    Port 0: the OS picks a free port when the broker starts; read it from the running server's
    ``settings.broker.port``.
    """
    section: dict[str, Any] = {"host": "127.0.0.1", "port": 0} | broker
    return Settings.model_validate(
        {"broker": section, "database": {"url": database_url}, "auth": {"bcrypt_cost": 4}}
    )


def connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    keep_alive: int = 30,
    clean_session: bool = True,
    will: tuple[str, bytes] | None = None,
    will_retain: bool = False,
) -> bytes:
    """A raw MQTT 3.1.1 CONNECT packet (``will``: topic and message, QoS 0)."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("!H", len(raw)) + raw

    flags = 0x02 if clean_session else 0
    payload = text(client_id)
    if will is not None:
        flags |= 0x04 | (0x20 if will_retain else 0)
        payload += text(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    if username is not None:
        flags |= 0x80
        payload += text(username)
    if password is not None:
        flags |= 0x40
        payload += text(password)
    variable = text("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive)
    body = variable + payload
    return bytes([0x10]) + remaining_length(len(body)) + body


def connack_code(host: str, port: int, client_id: str = "probe", timeout: float = 5.0, **kw: Any) -> int:
    """Send one CONNECT on a raw socket and return the CONNACK return code."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(connect_packet(client_id, **kw))
        data = _recv_exactly(sock, 4)
    if data[0] != 0x20 or data[1] != 2:
        raise AssertionError(f"not a CONNACK: {data!r}")
    return data[3]


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    buf = b""
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {count} bytes")
        buf += chunk
    return buf


def console_script(name: str) -> str:
    """An installed console script (``mqttprov``, amqtt's ``amqtt``) next to this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(f"{name} is not installed next to {sys.executable}")
    return found


def mqttprov_executable() -> str:
    """The installed ``mqttprov`` console script next to this interpreter."""
    return console_script("mqttprov")


def run_mqttprov(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``mqttprov ARGS`` as a real process (wide terminal so tables are not cut)."""
    return subprocess.run(
        [mqttprov_executable(), *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """Write a TOML configuration file made of these sections; returns ``path``."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            # TOML booleans are lower case; a JSON string literal is a valid TOML basic string.
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = json.dumps(str(value))
            lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost``/127.0.0.1 and its key, as PEM files (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_connack_code(
    host: str, port: int, cafile: Path, *, server_hostname: str = "localhost", timeout: float = 5.0
) -> int:
    """Like :func:`connack_code` over TLS, verifying the server against ``cafile``."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as sock,
    ):
        sock.sendall(connect_packet("tls-probe"))
        data = _recv_exactly(sock, 4)
    if data[0] != 0x20 or data[1] != 2:
        raise AssertionError(f"not a CONNACK: {data!r}")
    return data[3]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (one listener each), for separate processes (see :func:`free_port`)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@contextmanager
def preserved_logging() -> Iterator[None]:
    """Undo what ``configure_logging`` does to the root and library loggers (process-wide state)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("amqtt", "transitions", "alembic", "websockets", "aiosqlite", "asyncio")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)
