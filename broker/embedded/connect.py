"""Read a CONNECT and make its session: amqtt 0.12.1's checks and answers, our session class.

amqtt's ``BrokerProtocolHandler.init_from_connect`` names its session class inside the function;
this copy differs only there (a :class:`~broker.embedded.session.BrokerSession`) and in reading
the peer before the checks that need it. Diff it against amqtt's on an upgrade (docs/amqtt.md).
"""

from __future__ import annotations

from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.errors import MQTTError
from amqtt.events import MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.utils import format_client_message

from broker.embedded.session import BrokerSession

#: The protocol level of MQTT 3.1.1, the only one amqtt 0.12.1 speaks.
_MQTT_311 = 4


async def read_connect(reader: ReaderAdapter, writer: WriterAdapter, plugins_manager: Any) -> BrokerSession:
    """The session a well-formed CONNECT asks for; a refusal is answered, closed and raised.

    Raises :class:`~amqtt.errors.MQTTError` for a malformed or refused CONNECT (after sending the
    CONNACK amqtt would send, if any).
    """
    connect = await ConnectPacket.from_stream(reader)
    await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
    if connect.variable_header is None or connect.payload is None:
        raise MQTTError("CONNECT packet: variable header or payload not initialized.")
    if connect.payload.client_id is None:
        raise MQTTError("[[MQTT-3.1.3-3]] : Client identifier must be present")
    if connect.variable_header.will_flag and (
        connect.payload.will_topic is None or connect.payload.will_message is None
    ):
        raise MQTTError("Will flag set, but will topic/message not present in payload")
    if connect.variable_header.reserved_flag:
        raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
    if connect.proto_name != "MQTT":
        raise MQTTError(f'[MQTT-3.1.2-1] Incorrect protocol name: "{connect.proto_name}"')
    remote_address, remote_port = writer.get_peer_info() or (None, None)
    client = format_client_message(address=remote_address, port=remote_port)
    refusal: tuple[int, str | None] | None = None
    if connect.proto_level != _MQTT_311:
        refusal = UNACCEPTABLE_PROTOCOL_VERSION, f"Invalid protocol from {client}: {connect.proto_level}"
    elif not connect.username_flag and connect.password_flag:
        refusal = BAD_USERNAME_PASSWORD, None  # [MQTT-3.1.2-22]
    elif connect.username_flag and connect.username is None:
        refusal = BAD_USERNAME_PASSWORD, f"Invalid username from {client}"
    elif connect.password_flag and connect.password is None:
        refusal = BAD_USERNAME_PASSWORD, f"Invalid password from {client}"
    elif connect.clean_session_flag is False and connect.payload.client_id_is_random:
        refusal = IDENTIFIER_REJECTED, f"[MQTT-3.1.3-8] [MQTT-3.1.3-9] {client}: No client Id provided"
    if refusal is not None:
        code, message = refusal
        connack = ConnackPacket.build(0, code)  # [MQTT-3.2.2-4] session present 0
        await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
        await connack.to_stream(writer)
        await writer.close()
        raise MQTTError(message)
    session = BrokerSession()
    session.client_id = connect.client_id
    session.clean_session = connect.clean_session_flag
    session.will_flag = connect.will_flag
    session.will_retain = connect.will_retain_flag
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    session.username = connect.username
    session.password = connect.password
    session.remote_address = remote_address
    session.remote_port = remote_port
    session.ssl_object = writer.get_ssl_info()
    session.keep_alive = max(connect.keep_alive, 0)
    return session
