"""Figure: the login-timing side channel. Does a refusal tell whether the username exists?

From one client, interleaved one by one: CONNECT with an unknown device username, and CONNECT
with a wrong password for a device that has logged in before (so it has a stored verifier);
the time from sending CONNECT to reading the CONNACK (4 both times). The two medians must stay
within 25 % of each other, and neither may cost a bcrypt check. A third row shows what timing
still tells: a wrong password for a device that has never logged in costs a bcrypt check
(docs/security/verifiers.md); it has no goal.
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
#: Seconds between attempts, for the broker's background writes of the last one to end.
PAUSE = 0.02
#: Medians within 25 % of each other, whichever way round.
WITHIN = 1.25
_MAC = "02:00:00:17:00:01"
_FRESH_MAC = "02:00:00:17:00:02"
_PASSWORD = "the-real-password-of-the-bench-device"


def run(ctx: Context) -> FigureResult:
    """One broker process, one device at the figure's bcrypt cost, throttling out of the way."""
    cost = ctx.sizes.bcrypt_cost
    attempts = QUICK_ATTEMPTS if ctx.quick else ATTEMPTS
    figure = FigureResult(NAME, TITLE)
    url = sqlite_url(ctx.workdir / "login-timing.db")
    known, fresh = asyncio.run(_seed(url, cost))
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
    fresh_ms: list[float] = []
    with BrokerProcess(BrokerSpec("mqttprov", port, settings), ctx.workdir) as broker:
        # The known device logs in once (one bcrypt check, and its verifier is stored), then one
        # of each refusal, unmeasured: connection set-up and caches are warm.
        _connack(port, known, _PASSWORD, expected=0)
        _refusal_ms(port, "device_000000000000", "warm-up")
        _refusal_ms(port, known, "warm-up")
        _refusal_ms(port, fresh, "warm-up")
        before = broker.stats()
        # Each attempt under a client id never used before, on both sides: a prober picks its own
        # (the password is checked before the client id), and a new client id costs the broker
        # the same whatever the username.
        # A pause after each attempt: a wrong password for a known device leaves a folded audit
        # write behind it, which would otherwise slow whichever attempt comes next (always an
        # unknown username, in this order) and be measured as that attempt's cost.
        for n in range(attempts):
            unknown_ms.append(_refusal_ms(port, f"device_{n:012x}", "wrong-password", f"probe-u{n}"))
            time.sleep(PAUSE)
            known_ms.append(_refusal_ms(port, known, f"wrong-password-{n}", f"probe-k{n}"))
            time.sleep(PAUSE)
        fresh_attempts = max(10, attempts // 10)  # bcrypt each: a sample is enough
        fresh_ms += [
            _refusal_ms(port, fresh, f"wrong-password-{n}", f"probe-f{n}") for n in range(fresh_attempts)
        ]
        stats = broker.stats()
        notes = broker.log_summary()
    unknown, known_median = median(unknown_ms), median(known_ms)
    ctx.log(f"unknown username {unknown:.1f} ms, wrong password {known_median:.1f} ms (medians)")
    fresh_median = median(fresh_ms)
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
        Row(
            "refusal, wrong password for a device never logged in (median; what timing still tells)",
            "ms",
            fresh_median,
            unknown,
            "unknown username (median)",
            None,
            fresh_ms,
            unknown_ms,
        ),
    ]
    figure.processes = {
        "mqttprov": f"broker: 1 process (event loop + {stats['bcrypt_workers']} bcrypt worker threads)",
        "client": "the bench process: one raw-socket CONNECT at a time, the two kinds interleaved",
    }
    figure.sizes = {
        "attempts_per_side": attempts,
        "never_logged_in_attempts": fresh_attempts,
        "bcrypt_cost": cost,
    }
    bcrypt_runs = stats["bcrypt_checks"] - before["bcrypt_checks"]
    verifier_runs = stats["verifier_checks"] - before["verifier_checks"]
    figure.notes += [
        "time from sending CONNECT to reading CONNACK 4, on loopback; throttling disabled",
        (
            f"measured refusals checked by bcrypt: {bcrypt_runs} (the {fresh_attempts} for the device "
            f"never logged in); by a stored verifier: {verifier_runs} (the {attempts} wrong passwords "
            "for the known device); unknown usernames cost one HMAC against a dummy, not counted"
        ),
        *notes,
    ]
    return figure


async def _seed(url: str, cost: int) -> tuple[str, str]:
    """Two registered devices whose password we know: (one that will log in, one that never does)."""
    engine = await prepare(url)
    registry = DeviceRegistry(engine)
    try:
        digest = await asyncio.to_thread(bcrypt.hashpw, _PASSWORD.encode(), bcrypt.gensalt(cost))
        known, fresh = [
            await registry.create_device(mac, status=DeviceStatus.REGISTERED, password_hash=digest.decode())
            for mac in (_MAC, _FRESH_MAC)
        ]
    finally:
        await registry.close()
    return known.mqtt_username, fresh.mqtt_username


def _refusal_ms(port: int, username: str, password: str, client_id: str | None = None) -> float:
    """Milliseconds from CONNECT to CONNACK for one login that must be refused with code 4."""
    return _connack(port, username, password, expected=BAD_USERNAME_OR_PASSWORD, client_id=client_id)


def _connack(
    port: int, username: str, password: str, *, expected: int, client_id: str | None = None
) -> float:
    """Milliseconds from CONNECT to a CONNACK that must carry ``expected`` (client id: the username)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        packet = connect_packet(client_id or username, username=username, password=password)
        started = time.perf_counter()
        sock.sendall(packet)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise ConnectionError("the broker closed the connection before its CONNACK")
            answer += chunk
        elapsed = time.perf_counter() - started
    if answer[:2] != b"\x20\x02" or answer[3] != expected:
        raise AssertionError(f"expected CONNACK {expected}, got {answer!r}")
    return elapsed * 1000
