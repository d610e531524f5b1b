"""Our shortcuts and repairs around amqtt 0.12.1 internals stay wired: tests that fail if amqtt changes."""

from __future__ import annotations

import asyncio

import pytest
from transitions import MachineError

from broker.embedded import BrokerServer
from broker.embedded.amqtt_broker import _broadcast_topics
from broker.embedded.plugins.auth import MqttprovTopicPlugin
from broker.embedded.session import BrokerSession
from provisioning.contract import REQUEST_TOPIC
from tests.auth_support import PASSWORD, RawSession, eventually, make_device, polled


async def test_topic_checks_go_straight_to_the_acl(broker: BrokerServer) -> None:
    # amqtt keeps its topic plugins in ``plugins_manager._topic_plugins``; if that moves, the
    # broker silently falls back to amqtt's task-per-check path and this fails.
    assert broker.broker._acl_check is MqttprovTopicPlugin.check


async def test_only_provisioning_requests_fire_amqtts_broadcast_event(broker: BrokerServer) -> None:
    # The provisioning plugin is the only broadcast listener and declares its one topic: any other
    # message skips amqtt's task per event. A plugin without the declaration would get them all.
    assert broker.broker._broadcast_topics == frozenset({REQUEST_TOPIC})


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


async def test_connections_get_sessions_without_a_state_machine_object(broker: BrokerServer) -> None:
    # amqtt names its session class inside init_from_connect; our copy must be the one called.
    device = await make_device(broker.registry, "02:00:00:00:0c:02")
    user = device.mqtt_username
    raw = RawSession(broker.settings.broker.port)
    try:
        assert await asyncio.to_thread(raw.connect, user, username=user, password=PASSWORD) == 0
        session, _handler = broker.broker._sessions[user]
        assert isinstance(session, BrokerSession)
        assert session.transitions.state == "connected"
        assert "transitions" not in vars(session)
    finally:
        raw.close()


def test_a_broker_session_follows_amqtts_life_cycle_rules() -> None:
    session = BrokerSession()
    states = session.transitions
    assert (states.state, states.is_new(), states.is_connected()) == ("new", True, False)
    assert states.connect() is True
    assert session.transitions.is_connected()
    assert session.last_connect_time is not None
    assert session.last_disconnect_time is None
    # A second connect while connected is what amqtt's take-over path catches.
    with pytest.raises(MachineError):
        session.transitions.connect()
    assert session.transitions.disconnect() is True
    assert session.transitions.is_disconnected()
    assert session.last_disconnect_time is not None
    assert session.transitions.disconnect() is True  # disconnected -> disconnected is allowed
    assert session.transitions.connect() is True  # a persistent session resumes
    assert session.last_disconnect_time is None
    assert "state=connected" in repr(session)


def test_a_new_session_may_be_disconnected() -> None:
    session = BrokerSession()
    session.transitions.disconnect()
    assert session.transitions.state == "disconnected"


class _WantsEveryBroadcast:
    async def on_broker_message_broadcast(self, **_: object) -> None:
        return None


class _WantsOneTopic(_WantsEveryBroadcast):
    broadcast_topics = frozenset({"provision/request"})


class _DoesNotListen:
    pass


def test_broadcast_events_are_narrowed_only_when_every_listener_declares_its_topics() -> None:
    assert _broadcast_topics([_WantsOneTopic(), _DoesNotListen()]) == frozenset({"provision/request"})
    assert _broadcast_topics([_WantsOneTopic(), _WantsEveryBroadcast()]) is None
    assert _broadcast_topics([_DoesNotListen()]) == frozenset()
