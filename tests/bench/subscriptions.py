"""Load generators of the subscription figures: a retained store, and a storm of maximal SUBSCRIBEs.

``RetainTask`` fills a broker's retained store from one connection and confirms it is stored
(a retained message comes back on a new subscription to the last topic, and one client's
PUBLISHes are handled in order). ``SubscribeStormTask`` sends the same SUBSCRIBE, carrying as
many filters as the broker takes in one, again and again without waiting, as an attacker does;
every SUBSCRIBE makes the broker look for the retained messages its filters match.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from tests.bench.load import HOST, Control, Login, login_or_fail, wait_for_go
from tests.bench.mqtt import (
    PUBLISH,
    SUBACK,
    SUBACK_FAILURE,
    Connection,
    publish_packet,
    subscribe_filters_packet,
)

#: A device's state, as a fleet keeps it retained (what a new subscriber sees first).
STATE_PAYLOAD = b'{"online":true,"firmware":"1.0.0","temperature":21.5}'
_BATCH = 200


@dataclass(frozen=True)
class RetainTask:
    """Publish one retained QoS 0 message on each topic, then make sure the last one is stored."""

    port: int
    login: Login
    topics: tuple[str, ...]
    time_limit: float


@dataclass
class RetainResult:
    """Retained messages published, and the seconds until the last one was seen stored."""

    published: int
    seconds: float


@dataclass(frozen=True)
class SubscribeStormTask:
    """``repeats`` SUBSCRIBEs, each carrying every filter of ``topic_filters``, sent back to back."""

    port: int
    login: Login
    topic_filters: tuple[str, ...]
    repeats: int
    time_limit: float


@dataclass
class SubscribeStormResult:
    """When the storm began and when its last SUBACK came; filters granted and refused (0x80)."""

    started: float
    ended: float
    granted: int
    refused: int
    #: Retained messages the broker delivered for the storm's filters.
    retained: int


SubscriptionTask = RetainTask | SubscribeStormTask


async def _logged_in(port: int, login: Login) -> Connection:
    conn = await Connection.open(HOST, port)
    try:
        await login_or_fail(conn, login)
    except BaseException:
        conn.close()
        raise
    return conn


async def retain(task: RetainTask, control: Control) -> RetainResult:
    """Fill the store, in batches of PUBLISHes per write; stored once the last topic's message returns."""
    conn = await _logged_in(task.port, task.login)
    try:
        await wait_for_go(control)
        started = time.monotonic()
        for begin in range(0, len(task.topics), _BATCH):
            batch = task.topics[begin : begin + _BATCH]
            await conn.send(b"".join(publish_packet(t, STATE_PAYLOAD, retain=True) for t in batch))
        if task.topics:
            await _stored(conn, task.topics[-1], started + task.time_limit)
        return RetainResult(len(task.topics), time.monotonic() - started)
    finally:
        await conn.disconnect()


async def _stored(conn: Connection, topic: str, deadline: float) -> None:
    """Subscribe to ``topic`` and wait for its retained message (TimeoutError past ``deadline``)."""
    async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
        await conn.subscribe(topic)
        while True:
            packet = await conn.packet()
            if packet.kind == PUBLISH and packet.publish()[0] == topic:
                return


async def subscribe_storm(task: SubscribeStormTask, control: Control) -> SubscribeStormResult:
    """Every SUBSCRIBE in one write, then read until every SUBACK has come (retained messages counted)."""
    conn = await _logged_in(task.port, task.login)
    try:
        packets = b"".join(
            subscribe_filters_packet(task.topic_filters, packet_id=n + 1) for n in range(task.repeats)
        )
        await wait_for_go(control)
        started = time.monotonic()
        codes: Counter[bool] = Counter()
        subacks = retained = 0
        async with asyncio.timeout(task.time_limit):
            await conn.send(packets)
            while subacks < task.repeats:
                for packet in await conn.packets():
                    if packet.kind == SUBACK:
                        subacks += 1
                        codes.update(code == SUBACK_FAILURE for code in packet.body[2:])
                    elif packet.kind == PUBLISH:
                        retained += 1
        return SubscribeStormResult(started, time.monotonic(), codes[False], codes[True], retained)
    finally:
        await conn.disconnect()


__all__ = [
    "STATE_PAYLOAD",
    "RetainResult",
    "RetainTask",
    "SubscribeStormResult",
    "SubscribeStormTask",
    "SubscriptionTask",
    "retain",
    "subscribe_storm",
]
