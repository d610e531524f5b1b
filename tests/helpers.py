"""Small helpers shared by the tests: free ports, settings for a private broker, MQTT probes."""

from __future__ import annotations

import socket
import struct
from typing import Any

from config import Settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 1883)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != 1883:
            return port


def broker_settings(database_url: str, **broker: Any) -> Settings:
    """Settings for a private broker on loopback with a free port and cheap bcrypt."""
    section: dict[str, Any] = {"host": "127.0.0.1", "port": free_port()} | broker
    return Settings.model_validate(
        {"broker": section, "database": {"url": database_url}, "auth": {"bcrypt_cost": 4}}
    )


def connect_packet(client_id: str, *, username: str | None = None, password: str | None = None,
                   keep_alive: int = 30, clean_session: bool = True) -> bytes:
    """A raw MQTT 3.1.1 CONNECT packet."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("!H", len(raw)) + raw

    flags = 0x02 if clean_session else 0
    payload = text(client_id)
    if username is not None:
        flags |= 0x80
        payload += text(username)
    if password is not None:
        flags |= 0x40
        payload += text(password)
    variable = text("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive)
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


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
