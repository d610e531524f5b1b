"""Load generators of the restart and flood figures: devices that retry, and a flood of bad logins.

A device told CONNACK 3 (server unavailable) waits and tries again, as device firmware does;
the figures count those retries. The flood connects from another loopback address, so the
broker sees it as another host, and keeps going until the parent says ``stop``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass

from tests.bench.load import Control, Login, connect_once, wait_for_go
from tests.bench.mqtt import SERVER_UNAVAILABLE, MqttError


@dataclass(frozen=True)
class RetryLoginTask:
    """Each login until it is accepted, ``concurrency`` at a time; CONNACK 3 means try again later."""

    port: int
    logins: tuple[Login, ...]
    concurrency: int
    time_limit: float
    #: What a device waits after CONNACK 3 (or a dropped connection) before it tries again.
    retry_delay: float = 1.0
    timeout: float = 30.0


@dataclass
class RetryLoginResult:
    """Per login: its CONNACK 3 retries, and its time to acceptance (None: never accepted)."""

    started: float
    #: When the last login was accepted (``started`` when none was).
    ended: float
    retries: list[int]
    latencies_ms: list[float | None]
    #: Final refusals other than CONNACK 3 (a device does not retry a wrong password).
    refused: dict[int, int]
    errors: dict[str, int]

    @property
    def accepted(self) -> int:
        """Logins accepted in the end."""
        return sum(latency is not None for latency in self.latencies_ms)

    @property
    def rate(self) -> float:
        """Accepted logins per second, from the start to the last acceptance."""
        return self.accepted / max(self.ended - self.started, 1e-9)


@dataclass(frozen=True)
class FloodTask:
    """Bad CONNECTs from ``source``, ``concurrency`` at a time, until the parent says ``stop``.

    Every other CONNECT is an invented ``device_…`` username; the rest are real usernames
    with a wrong password.
    """

    port: int
    source: str
    usernames: tuple[str, ...]
    concurrency: int
    time_limit: float
    #: CONNECTs answered or dropped before the flood tells the parent ``flooding`` (in full swing).
    announce_after: int = 100
    #: Seconds a CONNECT waits for its answer before the flood drops it and sends another: an
    #: attacker does not wait out a slowed-down refusal.
    patience: float = 0.25


@dataclass
class FloodResult:
    """What the flood got: answers by CONNACK code and client-side errors."""

    started: float
    ended: float
    refused: dict[int, int]
    #: Client-side errors; ``TimeoutError``: dropped unanswered after ``patience``.
    errors: dict[str, int]
    sent: int = 0
    #: Bad CONNECTs that were accepted (must stay 0).
    accepted: int = 0

    @property
    def refusals_per_second(self) -> float:
        """Refusals of any kind per second of flood."""
        return sum(self.refused.values()) / max(self.ended - self.started, 1e-9)

    @property
    def sent_per_second(self) -> float:
        """CONNECTs sent per second of flood, answered or not."""
        return self.sent / max(self.ended - self.started, 1e-9)


LoginTask = RetryLoginTask | FloodTask


async def retry_logins(task: RetryLoginTask, control: Control) -> RetryLoginResult:
    """Log every device in, retrying after CONNACK 3 and dropped connections until the time limit."""
    await wait_for_go(control)
    started = time.monotonic()
    deadline = started + task.time_limit
    retries = [0] * len(task.logins)
    latencies: list[float | None] = [None] * len(task.logins)
    refused: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    last_accepted = started
    next_index = 0

    async def device() -> None:
        nonlocal next_index, last_accepted
        while next_index < len(task.logins):
            index = next_index
            next_index += 1
            while time.monotonic() < deadline:
                try:
                    async with asyncio.timeout(task.timeout):
                        code = await connect_once(task.port, task.logins[index])
                except (OSError, TimeoutError, MqttError) as exc:
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(task.retry_delay)
                    continue
                if code == 0:
                    last_accepted = time.monotonic()
                    latencies[index] = (last_accepted - started) * 1000
                    break
                if code != SERVER_UNAVAILABLE:
                    refused[code] += 1
                    break
                retries[index] += 1
                await asyncio.sleep(task.retry_delay)

    await asyncio.gather(*(device() for _ in range(task.concurrency)))
    return RetryLoginResult(started, last_accepted, retries, latencies, dict(refused), dict(errors))


def flood_login(usernames: tuple[str, ...], count: int) -> Login:
    """The ``count``-th bad CONNECT: an invented device username, or a real one with a wrong password."""
    password = secrets.token_urlsafe(18)
    if count % 2 == 0 or not usernames:
        username = f"device_{secrets.token_hex(16)}"
    else:
        username = usernames[(count // 2) % len(usernames)]
    return Login(username, username, password)


async def flood(task: FloodTask, control: Control) -> FloodResult:
    """Keep ``concurrency`` bad CONNECTs in flight until ``stop`` (or the time limit)."""
    await wait_for_go(control)
    started = time.monotonic()
    refused: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    accepted = 0
    sent = 0
    done = 0

    async def attacker() -> None:
        nonlocal sent, accepted, done
        while True:
            login = flood_login(task.usernames, sent)
            sent += 1
            try:
                async with asyncio.timeout(task.patience):
                    code = await connect_once(task.port, login, source=task.source)
            except (OSError, TimeoutError, MqttError) as exc:
                errors[type(exc).__name__] += 1
                if not isinstance(exc, TimeoutError):
                    await asyncio.sleep(0.01)  # a refused TCP connect fails at once: do not spin
            else:
                if code == 0:
                    accepted += 1
                else:
                    refused[code] += 1
            done += 1
            if done == task.announce_after:
                control.send("flooding")

    attackers = [asyncio.create_task(attacker(), name=f"flood-{n}") for n in range(task.concurrency)]
    try:
        await control.command(task.time_limit)  # "stop", or the time limit
    finally:
        ended = time.monotonic()
        for attacker_task in attackers:
            attacker_task.cancel()  # a CONNECT in flight closes its socket
        await asyncio.gather(*attackers, return_exceptions=True)
    return FloodResult(started, ended, dict(refused), dict(errors), sent, accepted)


__all__ = [
    "FloodResult",
    "FloodTask",
    "LoginTask",
    "RetryLoginResult",
    "RetryLoginTask",
    "flood",
    "flood_login",
    "retry_logins",
]
