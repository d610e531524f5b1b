"""MqttLink under concurrent QoS 1 publishes, as the worker makes them (one task per request).

A PUBACK handled by paho's network thread while the event loop is inside ``publish`` once
deadlocked the two threads (each held the lock the other wanted) and froze the event loop. The
link runs on an event loop in a thread of its own here, so that a deadlock fails the test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from broker.external.mosquitto.dynsec import DynsecClient
from provisioning.external.link import MqttLink, parse_broker_url
from tests.mosquitto_node import ADMIN, ADMIN_PASSWORD, mosquitto_missing, mosquitto_node

# slow, the whole file: a private Mosquitto.
pytestmark = [
    pytest.mark.skipif(mosquitto_missing() is not None, reason=mosquitto_missing() or ""),
    pytest.mark.slow,
]

PUBLISHES = 2000
CONCURRENT = 50
#: Thread switches this often (seconds) make the two threads interleave inside publish() often.
SWITCH_INTERVAL = 1e-6
#: Far more than the publishes need (about a second here); reached only by a deadlock.
DEADLINE = 30.0


async def _publish_concurrently(port: int) -> int:
    address = parse_broker_url(f"mqtt://127.0.0.1:{port}")
    async with MqttLink(address, client_id="test-link", username=ADMIN, password=ADMIN_PASSWORD) as link:
        dynsec = DynsecClient(link)
        await dynsec.start()
        try:
            gate = asyncio.Semaphore(CONCURRENT)

            async def one(n: int) -> None:
                async with gate:
                    # The admin may publish on the control topics only: a harmless read command.
                    await dynsec.call("getDefaultACLAccess")
                    del n

            await asyncio.gather(*(one(n) for n in range(PUBLISHES)))
        finally:
            await dynsec.stop()
    return PUBLISHES


def test_concurrent_qos1_publishes_are_all_acknowledged(tmp_path: Path) -> None:
    done: list[int] = []
    failed: list[BaseException] = []

    def main(port: int) -> None:
        try:
            done.append(asyncio.run(_publish_concurrently(port)))
        except BaseException as exc:  # reported by the assertions below
            failed.append(exc)

    previous = sys.getswitchinterval()
    with mosquitto_node(tmp_path / "mosquitto") as node:
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            thread = threading.Thread(target=main, args=(node.device_port,), daemon=True)
            thread.start()
            thread.join(DEADLINE)
        finally:
            sys.setswitchinterval(previous)
        assert not thread.is_alive(), "the link's event loop froze (deadlock between paho and the loop)"
    assert failed == []
    assert done == [PUBLISHES]
