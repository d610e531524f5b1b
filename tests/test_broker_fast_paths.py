"""Our shortcuts around amqtt 0.12.1 internals stay wired: a test that fails if amqtt changes."""

from __future__ import annotations

from auth_plugin.plugin import MqttprovTopicPlugin
from broker import BrokerServer


async def test_topic_checks_go_straight_to_the_acl(broker: BrokerServer) -> None:
    # amqtt keeps its topic plugins in ``plugins_manager._topic_plugins``; if that moves, the
    # broker silently falls back to amqtt's task-per-check path and this fails.
    assert broker.broker._acl_check is MqttprovTopicPlugin.check
