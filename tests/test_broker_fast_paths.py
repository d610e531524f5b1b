"""Our shortcuts and repairs around amqtt 0.12.1 internals stay wired: tests that fail if amqtt changes."""

from __future__ import annotations

import asyncio

from auth_plugin.plugin import MqttprovTopicPlugin
from broker import BrokerServer
from tests.auth_support import PASSWORD, RawSession, eventually, make_device, polled


async def test_topic_checks_go_straight_to_the_acl(broker: BrokerServer) -> None:
    # amqtt keeps its topic plugins in ``plugins_manager._topic_plugins``; if that moves, the
    # broker silently falls back to amqtt's task-per-check path and this fails.
    assert broker.broker._acl_check is MqttprovTopicPlugin.check


async def test_a_connection_whose_last_drain_fails_still_has_its_transport_closed(
    broker: BrokerServer,
) -> None:
    device = await make_device(broker.registry, "02:00:00:00:0c:01")
    user = device.mqtt_username
    session = RawSession(broker.settings.broker.port)
    assert await asyncio.to_thread(session.connect, user, username=user, password=PASSWORD) == 0
    _session, handler = broker.broker._sessions[user]
    stream = handler.writer._writer

    async def peer_gone() -> None:
        raise ConnectionResetError("the peer went away in the middle of a delivery")

    stream.drain = peer_gone  # the fault: amqtt's close() drains first, and gave up here
    session.close()

    assert await eventually(polled(stream.is_closing), bool)
