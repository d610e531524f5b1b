"""The in-process broker fixture: it listens on loopback and speaks MQTT."""

from __future__ import annotations

import asyncio

from broker.embedded import BrokerServer
from tests.helpers import connack_code


async def test_broker_refuses_unknown_clients_with_connack_5(broker: BrokerServer) -> None:
    settings = broker.settings.broker
    code = await asyncio.to_thread(connack_code, settings.host, settings.port, "somebody")
    assert code == 5
