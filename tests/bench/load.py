"""Load generators: each task runs in a spawned process of its own, driven over a pipe.

The parent sends ``go`` when every process is ready, so process start-up never counts; each
process answers with one result object. Timestamps are :func:`time.monotonic`, which is
``CLOCK_MONOTONIC`` on Linux and therefore comparable across processes. Every loop here is
bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import struct
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import TYPE_CHECKING, Any

from tests.bench.mqtt import (
    PUBACK,
    PUBLISH,
    SERVER_UNAVAILABLE,
    SUBACK,
    Connection,
    MqttError,
    puback_packet,
    publish_packet,
)

if TYPE_CHECKING:
    from tests.bench.logins import LoginTask
    from tests.bench.subscriptions import SubscriptionTask

HOST = "127.0.0.1"
#: A payload carrying the publisher's send time, padded to a typical telemetry size.
_STAMP = struct.Struct("!dI")
_PAD = b"x" * 48


@dataclass(frozen=True)
class Login:
    """What one CONNECT presents."""

    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)


# -- tasks and their results --------------------------------------------------------------------


@dataclass(frozen=True)
class StormTask:
    """CONNECT, wait for CONNACK, DISCONNECT, once per login, ``concurrency`` at a time."""

    port: int
    logins: tuple[Login, ...]
    concurrency: int
    time_limit: float
    timeout: float = 30.0


@dataclass
class StormResult:
    """What one storm process saw."""

    started: float
    ended: float
    accepted: int
    refused: dict[int, int]
    errors: dict[str, int]
    latencies_ms: list[float]


@dataclass(frozen=True)
class IdleTask:
    """Open one connection per login and keep them all open until told to let go."""

    port: int
    logins: tuple[Login, ...]
    concurrency: int
    time_limit: float
    keep_alive: int = 600
    #: Empty, or one filter per login: each connection subscribes to its own once accepted, as a
    #: device does to its namespace (a refused subscription counts as an ``MqttError``).
    topic_filters: tuple[str, ...] = ()
    #: Seconds to wait before trying a login told CONNACK 3 (server unavailable) again, as device
    #: firmware does; None: counted as refused.
    retry_delay: float | None = None

    def __post_init__(self) -> None:
        if self.topic_filters and len(self.topic_filters) != len(self.logins):
            raise ValueError("topic_filters needs one filter per login (or none)")


@dataclass
class IdleResult:
    """How many connections were held."""

    connected: int
    refused: dict[int, int]
    errors: dict[str, int]
    seconds: float
    #: CONNACK 3 answers that were tried again (with ``retry_delay``).
    retries: int = 0


@dataclass(frozen=True)
class ProbeTask:
    """A publisher at ``rate`` msg/s and a subscriber that timestamps each delivery."""

    port: int
    publisher: Login
    subscriber: Login
    topic: str
    topic_filter: str
    rate: float
    time_limit: float
    #: After this many seconds of publishing the probe tells the parent ``quiet`` (baseline done).
    quiet_seconds: float = 0.0


@dataclass
class ProbeResult:
    """One sample per message: when it was sent, and its latency in ms (None: never delivered)."""

    sent_at: list[float]
    latencies_ms: list[float | None]


@dataclass(frozen=True)
class Pair:
    """One publisher and the subscriber that receives its messages."""

    publisher: Login
    topic: str
    subscriber: Login
    topic_filter: str


@dataclass(frozen=True)
class PubSubTask:
    """Every publisher sends ``messages`` QoS 0 messages as fast as the broker takes them."""

    port: int
    pairs: tuple[Pair, ...]
    messages: int
    time_limit: float
    batch: int = 20
    #: Messages a publisher may have sent that its subscriber has not received yet (0: no bound).
    #: Bounded, a broker that falls behind is not left with a backlog to work through after the
    #: round (on a machine whose cores the next round shares).
    window: int = 0


@dataclass
class PubSubResult:
    """Messages sent and delivered, between the first send and the last delivery."""

    sent: int
    received: int
    first_sent: float
    last_received: float


@dataclass(frozen=True)
class ProvisionTask:
    """Provision each MAC over MQTT (the device side of the contract), ``concurrency`` at a time."""

    port: int
    macs: tuple[str, ...]
    concurrency: int
    time_limit: float
    #: The provisioning proof (``provision`` and the fleet secret), if the broker asks for one.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 60.0


@dataclass
class ProvisionResult:
    """Replies by status (``ok`` or the error code) and errors seen on the client side."""

    started: float
    ended: float
    outcomes: dict[str, int]
    latencies_ms: list[float]


Task = StormTask | IdleTask | ProbeTask | PubSubTask | ProvisionTask


class Control:
    """The child's end of the pipe, usable from the event loop."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def send(self, kind: str, payload: Any = None) -> None:
        self.pipe.send((kind, payload))

    async def command(self, timeout: float) -> str | None:
        """The parent's next command, or None when ``timeout`` passed or the parent went away."""
        ready = await asyncio.to_thread(self.pipe.poll, timeout)
        if not ready:
            return None
        try:
            command: str = self.pipe.recv()
        except EOFError:
            return None
        return command


def child_main(task: Task | LoginTask | SubscriptionTask, pipe: Pipe) -> None:
    """Entry point of a load process: ready, wait for ``go``, run, send the result."""
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = Control(pipe)
    try:
        asyncio.run(_drive(task, control))
    except BaseException:
        control.send("error", traceback.format_exc())
    finally:
        pipe.close()


_Runner = Callable[[Any, Control], Awaitable[Any]]


async def _drive(task: Task | LoginTask | SubscriptionTask, control: Control) -> None:
    runners: dict[type, _Runner] = {
        StormTask: _storm,
        IdleTask: _idle,
        ProbeTask: _probe,
        PubSubTask: _pubsub,
        ProvisionTask: _provision,
    }
    # Imported here: those load generators build on this module's pieces.
    from tests.bench import logins, subscriptions  # noqa: PLC0415

    runners |= {logins.RetryLoginTask: logins.retry_logins, logins.FloodTask: logins.flood}
    runners |= {
        subscriptions.RetainTask: subscriptions.retain,
        subscriptions.SubscribeStormTask: subscriptions.subscribe_storm,
    }
    result = await runners[type(task)](task, control)
    control.send("result", result)


async def wait_for_go(control: Control, timeout: float = 300.0) -> None:
    """Tell the parent this process is ready, and wait for its ``go``."""
    control.send("ready")
    if await control.command(timeout) != "go":
        raise RuntimeError("no 'go' from the parent")


# -- connect storm ------------------------------------------------------------------------------


async def _storm(task: StormTask, control: Control) -> StormResult:
    await wait_for_go(control)
    started = time.monotonic()
    deadline = started + task.time_limit
    refused: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < len(task.logins) and time.monotonic() < deadline:
            login = task.logins[next_index]
            next_index += 1
            began = time.monotonic()
            try:
                async with asyncio.timeout(task.timeout):
                    code = await connect_once(task.port, login)
            except (OSError, TimeoutError, MqttError) as exc:
                errors[type(exc).__name__] += 1
                continue
            if code == 0:
                latencies.append((time.monotonic() - began) * 1000)
            else:
                refused[code] += 1

    await asyncio.gather(*(client() for _ in range(task.concurrency)))
    return StormResult(started, time.monotonic(), len(latencies), dict(refused), dict(errors), latencies)


async def connect_once(port: int, login: Login, *, source: str | None = None) -> int:
    """CONNECT, then DISCONNECT when accepted; the CONNACK return code."""
    conn = await Connection.open(HOST, port, source=source)
    try:
        code = await conn.login(login.client_id, login.username, login.password)
    except BaseException:
        conn.close()
        raise
    if code == 0:
        await conn.disconnect()
    else:
        conn.close()
    return code


# -- idle connections ---------------------------------------------------------------------------


async def _idle(task: IdleTask, control: Control) -> IdleResult:
    await wait_for_go(control)
    started = time.monotonic()
    deadline = started + task.time_limit
    held: list[Connection] = []
    refused: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    pending = deque(range(len(task.logins)))
    retries = 0

    async def opener() -> None:
        nonlocal retries
        while pending and time.monotonic() < deadline:
            index = pending.popleft()
            login = task.logins[index]
            conn: Connection | None = None
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    conn = await Connection.open(HOST, task.port)
                    code = await conn.login(
                        login.client_id, login.username, login.password, keep_alive=task.keep_alive
                    )
                    if code == 0 and task.topic_filters:
                        await conn.subscribe(task.topic_filters[index])
            except (OSError, TimeoutError, MqttError) as exc:
                errors[type(exc).__name__] += 1
                if conn is not None:
                    conn.close()
                continue
            if code == 0:
                held.append(conn)
                continue
            conn.close()
            if code == SERVER_UNAVAILABLE and task.retry_delay is not None:
                retries += 1
                await asyncio.sleep(task.retry_delay)
                pending.append(index)
            else:
                refused[code] += 1

    try:
        await asyncio.gather(*(opener() for _ in range(task.concurrency)))
        result = IdleResult(len(held), dict(refused), dict(errors), time.monotonic() - started, retries)
        control.send("holding", result)
        await control.command(task.time_limit)  # "release", or give up after the time limit
    finally:
        for conn in held:
            conn.close()
    return result


# -- latency probe ------------------------------------------------------------------------------


async def _probe(task: ProbeTask, control: Control) -> ProbeResult:
    subscriber = await Connection.open(HOST, task.port)
    publisher = await Connection.open(HOST, task.port)
    try:
        for conn, login in ((subscriber, task.subscriber), (publisher, task.publisher)):
            code = await conn.login(login.client_id, login.username, login.password)
            if code != 0:
                raise MqttError(f"probe login {login.client_id!r} refused with CONNACK {code}")
        await subscriber.subscribe(task.topic_filter)
        await wait_for_go(control)
        return await _probe_run(task, control, publisher, subscriber)
    finally:
        publisher.close()
        subscriber.close()


async def _probe_run(
    task: ProbeTask, control: Control, publisher: Connection, subscriber: Connection
) -> ProbeResult:
    sent_at: list[float] = []
    latencies: list[float | None] = []
    stop = asyncio.Event()
    caught_up = asyncio.Event()
    delivered = 0

    async def receive() -> None:
        nonlocal delivered
        while True:
            for packet in await subscriber.packets():
                if packet.kind != PUBLISH:
                    continue
                _topic, _packet_id, payload = packet.publish()
                sent, index = _STAMP.unpack_from(payload)
                if index < len(latencies) and latencies[index] is None:
                    latencies[index] = (time.monotonic() - sent) * 1000
                    delivered += 1
            if delivered == len(latencies):
                caught_up.set()

    async def listen() -> None:
        await control.command(task.time_limit)
        stop.set()

    receiver = asyncio.create_task(receive(), name="probe-receive")
    listener = asyncio.create_task(listen(), name="probe-listen")
    started = time.monotonic()
    period = 1.0 / task.rate
    limit = int(task.time_limit * task.rate)
    quiet_told = False
    try:
        for index in range(limit):
            if stop.is_set():
                break
            if not quiet_told and index * period >= task.quiet_seconds:
                control.send("quiet")
                quiet_told = True
            # Paced by the clock, not by the previous send: a stalled broker does not slow the schedule.
            delay = started + index * period - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            now = time.monotonic()
            sent_at.append(now)
            latencies.append(None)
            caught_up.clear()
            await publisher.send(publish_packet(task.topic, _STAMP.pack(now, index) + _PAD))
        # Give the last messages a bounded chance to arrive.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 2.0)
    finally:
        receiver.cancel()
        listener.cancel()
        await asyncio.gather(receiver, listener, return_exceptions=True)
    return ProbeResult(sent_at, latencies)


# -- publish throughput -------------------------------------------------------------------------


async def _pubsub(task: PubSubTask, control: Control) -> PubSubResult:
    subscribers: list[Connection] = []
    publishers: list[Connection] = []
    try:
        for pair in task.pairs:
            sub = await Connection.open(HOST, task.port)
            subscribers.append(sub)
            await login_or_fail(sub, pair.subscriber)
            await sub.subscribe(pair.topic_filter)
            pub = await Connection.open(HOST, task.port)
            publishers.append(pub)
            await login_or_fail(pub, pair.publisher)
        await wait_for_go(control)
        return await _pubsub_run(task, publishers, subscribers)
    finally:
        for conn in (*publishers, *subscribers):
            conn.close()


async def login_or_fail(conn: Connection, login: Login) -> None:
    """Log in on ``conn``; :class:`MqttError` when refused."""
    code = await conn.login(login.client_id, login.username, login.password)
    if code != 0:
        raise MqttError(f"login {login.client_id!r} refused with CONNACK {code}")


async def _pubsub_run(
    task: PubSubTask, publishers: list[Connection], subscribers: list[Connection]
) -> PubSubResult:
    started = time.monotonic()
    deadline = started + task.time_limit
    received = [0] * len(subscribers)
    sent = [0] * len(publishers)
    #: What each receiver waits for: every message, until publishing ends; then what was sent.
    expected = [task.messages] * len(subscribers)
    progress = [asyncio.Event() for _ in subscribers]
    last_received = started

    async def publish(index: int) -> None:
        conn, topic = publishers[index], task.pairs[index].topic
        packet = publish_packet(topic, _PAD)
        while sent[index] < task.messages and time.monotonic() < deadline:
            count = min(task.batch, task.messages - sent[index])
            if task.window:
                room = task.window - (sent[index] - received[index])
                if room <= 0:
                    progress[index].clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(progress[index].wait(), max(deadline - time.monotonic(), 0.0))
                    continue
                count = min(count, room)
            await conn.send(packet * count)
            sent[index] += count

    async def receive(index: int) -> None:
        nonlocal last_received
        conn = subscribers[index]
        while received[index] < expected[index]:
            for packet in await conn.packets():
                if packet.kind == PUBLISH:
                    received[index] += 1
            last_received = time.monotonic()
            progress[index].set()

    receivers = [asyncio.create_task(receive(i), name=f"receive-{i}") for i in range(len(subscribers))]
    try:
        await asyncio.gather(*(publish(i) for i in range(len(publishers))))
        # Publishing stopped at the time limit: wait for what was sent, not for all that was asked.
        for index, receiver in enumerate(receivers):
            expected[index] = sent[index]
            if received[index] >= sent[index]:
                receiver.cancel()
        await asyncio.wait(receivers, timeout=max(deadline - time.monotonic(), 0.0) + 5.0)
    finally:
        for receiver in receivers:
            receiver.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
    return PubSubResult(sum(sent), sum(received), started, last_received)


# -- provisioning -------------------------------------------------------------------------------


async def _provision(task: ProvisionTask, control: Control) -> ProvisionResult:
    await wait_for_go(control)
    started = time.monotonic()
    deadline = started + task.time_limit
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    next_index = 0

    async def device() -> None:
        nonlocal next_index
        while next_index < len(task.macs) and time.monotonic() < deadline:
            mac = task.macs[next_index]
            next_index += 1
            began = time.monotonic()
            try:
                async with asyncio.timeout(task.timeout):
                    status = await _provision_once(task, mac)
            except (OSError, TimeoutError, MqttError, ValueError) as exc:
                outcomes[f"client {type(exc).__name__}"] += 1
                continue
            outcomes[status] += 1
            if status == "ok":
                latencies.append((time.monotonic() - began) * 1000)

    await asyncio.gather(*(device() for _ in range(task.concurrency)))
    return ProvisionResult(started, time.monotonic(), dict(outcomes), latencies)


async def _provision_once(task: ProvisionTask, mac: str) -> str:
    """One provisioning session; returns ``ok`` or the refusal's error code."""
    conn = await Connection.open(HOST, task.port)
    try:
        code = await conn.login(mac, task.username, task.password)
        if code != 0:
            return f"CONNACK {code}"
        reply_topic = f"provision/reply/{mac}"
        await conn.subscribe(reply_topic, qos=1)
        request_id = uuid.uuid4().hex
        body = json.dumps({"mac": mac, "request_id": request_id}).encode()
        await conn.send(publish_packet("provision/request", body, qos=1, packet_id=2))
        while True:
            packet = await conn.packet()
            if packet.kind in (PUBACK, SUBACK):
                continue
            if packet.kind != PUBLISH:
                continue
            topic, packet_id, payload = packet.publish()
            if packet_id is not None:
                await conn.send(puback_packet(packet_id))
            if topic != reply_topic:
                continue
            reply = json.loads(payload)
            if reply.get("request_id") != request_id:
                continue
            status = str(reply.get("status"))
            return status if status != "error" else str(reply.get("error_code"))
    finally:
        await conn.disconnect()
