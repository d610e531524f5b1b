"""Figure: the login-timing side channel. Does a refusal tell whether the username exists?

From one client, interleaved one by one: CONNECT with an unknown device username, and CONNECT
with a known device username and a wrong password; the time from sending CONNECT to reading
the CONNACK (4 both times). The two medians must stay within 25 % of each other.
"""

from __future__ import annotations

import asyncio
import socket
import time

import bcrypt

from provisioning.registry import DeviceRegistry, DeviceStatus
from tests.bench.brokers import BrokerProcess, BrokerSpec
from tests.bench.context import Context
from tests.bench.figures.common import free_port, mqttprov_settings, sqlite_url
from tests.bench.fleet import prepare
from tests.bench.results import FigureResult, Goal, Row, median
from tests.helpers import connect_packet

NAME = "login-timing"
TITLE = "login timing side channel"
#: Attempts per side in a full run (the issue asks for 200); a quick run makes fewer.
ATTEMPTS = 200
QUICK_ATTEMPTS = 60
BAD_USERNAME_OR_PASSWORD = 4
#: Medians within 25 % of each other, whichever way round.
WITHIN = 1.25
_MAC = "02:00:00:17:00:01"
_PASSWORD = "the-real-password-of-the-bench-device"


def run(ctx: Context) -> FigureResult:
    """One broker process, one device at the figure's bcrypt cost, throttling out of the way."""
    cost = ctx.sizes.bcrypt_cost
    attempts = QUICK_ATTEMPTS if ctx.quick else ATTEMPTS
    figure = FigureResult(NAME, TITLE)
    url = sqlite_url(ctx.workdir / "login-timing.db")
    known = asyncio.run(_seed(url, cost))
    port = free_port()
    # Every refusal here comes from 127.0.0.1: throttling would measure itself, not bcrypt.
    settings = mqttprov_settings(
        url,
        port,
        cost=cost,
        auth={"throttle_after": 10**9, "lockout_after": 10**9, "max_refusal_delay": 0},
    )
    unknown_ms: list[float] = []
    known_ms: list[float] = []
    with BrokerProcess(BrokerSpec("mqttprov", port, settings), ctx.workdir) as broker:
        # One of each first, unmeasured: connection set-up, caches and the dummy hash are warm.
        _refusal_ms(port, "device_000000000000", "warm-up")
        _refusal_ms(port, known, "warm-up")
        for n in range(attempts):
            unknown_ms.append(_refusal_ms(port, f"device_{n:012x}", "wrong-password"))
            known_ms.append(_refusal_ms(port, known, f"wrong-password-{n}"))
        stats = broker.stats()
        notes = broker.log_summary()
    unknown, known_median = median(unknown_ms), median(known_ms)
    ctx.log(f"unknown username {unknown:.1f} ms, wrong password {known_median:.1f} ms (medians)")
    figure.rows += [
        Row(
            "refusal, wrong password for a known username (median)",
            "ms",
            known_median,
            unknown,
            "unknown username (median)",
            Goal("ratio_at_most", WITHIN),
            known_ms,
            unknown_ms,
        ),
        Row(
            "refusal, unknown username (median)",
            "ms",
            unknown,
            known_median,
            "wrong password for a known username (median)",
            Goal("ratio_at_most", WITHIN),
            unknown_ms,
            known_ms,
        ),
    ]
    figure.processes = {
        "mqttprov": f"broker: 1 process (event loop + {stats['bcrypt_workers']} bcrypt worker threads)",
        "client": "the bench process: one raw-socket CONNECT at a time, the two kinds interleaved",
    }
    figure.sizes = {"attempts_per_side": attempts, "bcrypt_cost": cost}
    figure.notes += [
        "time from sending CONNECT to reading CONNACK 4, on loopback; throttling disabled",
        (
            f"password checks counted by the broker: {stats['bcrypt_checks']} for {attempts + 1} "
            "known-username refusals (an unknown username is checked against a dummy hash of the "
            "same cost, not counted)"
        ),
        *notes,
    ]
    return figure


async def _seed(url: str, cost: int) -> str:
    """The database with one registered device whose password is not the one we send."""
    engine = await prepare(url)
    registry = DeviceRegistry(engine)
    try:
        digest = await asyncio.to_thread(bcrypt.hashpw, _PASSWORD.encode(), bcrypt.gensalt(cost))
        device = await registry.create_device(
            _MAC, status=DeviceStatus.REGISTERED, password_hash=digest.decode()
        )
    finally:
        await registry.close()
    return device.mqtt_username


def _refusal_ms(port: int, username: str, password: str) -> float:
    """Milliseconds from CONNECT to CONNACK for one login that must be refused with code 4."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        packet = connect_packet(username, username=username, password=password)
        started = time.perf_counter()
        sock.sendall(packet)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise ConnectionError("the broker closed the connection before its CONNACK")
            answer += chunk
        elapsed = time.perf_counter() - started
    if answer[:2] != b"\x20\x02" or answer[3] != BAD_USERNAME_OR_PASSWORD:
        raise AssertionError(f"expected CONNACK 4, got {answer!r}")
    return elapsed * 1000
