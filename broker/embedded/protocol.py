"""amqtt's per-connection protocol handler, with keep-alive enforced (pinned to amqtt 0.12.1).

amqtt 0.12.1 notices a silent client (no packet within the keep-alive) but then just keeps
reading. MQTT 3.1.1 §3.1.2.10 says the server must disconnect it after 1.5 times the keep-alive,
as if the network had failed (so the will is published).

The connection's life cycle is ours too: an end signalled while amqtt's ``start()`` runs is not
lost, ``stop()`` ends the packet stream first and always closes the socket, and ``finished``
says when the broker is done with the connection. Bounded flows and redelivery:
:mod:`~broker.embedded.flow`; reading the CONNECT: :mod:`~broker.embedded.connect`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.mqtt.disconnect import DisconnectPacket

from auth_plugin.logsafe import BurstLog, shown
from broker.embedded.connect import read_connect
from broker.embedded.flow import BoundedFlow
from broker.embedded.session import BrokerSession

logger = logging.getLogger(__name__)
_silent = BurstLog(logger, "clients silent past their keep-alive disconnected")


def grace(keep_alive: int) -> int:
    """Seconds of silence after which a client with ``keep_alive`` is dropped (1.5 x, rounded up)."""
    return math.ceil(keep_alive * 1.5) if keep_alive > 0 else 0


class KeepAliveHandler(BoundedFlow):
    """amqtt's connection handler with keep-alive enforced, bounded flows (:class:`BoundedFlow`)
    and a connection life cycle that loses no end and leaves no socket open."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expiry: asyncio.Task[None] | None = None
        self._started = False
        self._early_end: tuple[DisconnectPacket | None] | None = None
        #: Set once the broker has finished with this connection (will sent, session disconnected).
        self.finished = asyncio.Event()

    @classmethod
    async def init_from_connect(
        cls, reader: ReaderAdapter, writer: WriterAdapter, plugins_manager: Any, loop: Any = None
    ) -> tuple[KeepAliveHandler, BrokerSession]:
        """amqtt 0.12.1's, the same checks and answers, making a :class:`BrokerSession`
        (see :func:`~broker.embedded.connect.read_connect`)."""
        session = await read_connect(reader, writer, plugins_manager)
        return cls(plugins_manager, loop=loop), session

    async def start(self) -> None:
        """amqtt's start, then any end of the connection that came while it was starting."""
        await super().start()
        self._started = True
        if self._early_end is not None:
            (packet,) = self._early_end
            self._early_end = None
            await super().handle_disconnect(packet)

    async def stop(self) -> None:
        """End the packet stream, then amqtt's stop (which cancels the reader task).

        On Python 3.11 ``asyncio.wait_for`` loses a cancellation that lands while the read it
        wraps completes, and amqtt's reader loop wraps every read in it: with packets already
        buffered (a flood) the loop read on after stop(), and stop() waited for it forever.
        """
        if self.reader is not None:
            self.reader.feed_eof()
        try:
            await super().stop()
        finally:
            close_transport(self.writer)

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        """amqtt's, except that a DISCONNECT or lost link during :meth:`start` is not lost.

        amqtt 0.12.1 creates the future the broker waits on for the end of the connection only
        after ``start()`` (which already reads packets, and resends what a persistent session has
        in flight) returns: an end signalled before that was dropped, leaving the session
        "connected" and its tasks waiting forever on a closed socket.
        """
        if not self._started:
            self._early_end = (disconnect,)
            return
        await super().handle_disconnect(disconnect)

    def handle_read_timeout(self) -> None:
        """amqtt calls this when nothing arrived within the (already 1.5 x) keep-alive."""
        if self._expiry is not None:
            return
        client_id = self.session.client_id if self.session else None
        _silent.refused("client %s silent past its keep-alive: disconnecting", shown(client_id))
        # Abnormal end of the connection: the broker loop then publishes the will, as for a lost link.
        self._expiry = asyncio.ensure_future(self.handle_connection_closed())


def close_transport(writer: WriterAdapter | None) -> None:
    """Close the socket under amqtt's writer adapter, whatever state the adapter is in.

    amqtt's StreamWriterAdapter.close() drains before it closes: when the peer went away in the
    middle of a delivery the drain raises, amqtt logs it at DEBUG, and the transport is never
    closed (only collected, with a ResourceWarning). Websocket writers have no such transport.
    """
    if not isinstance(writer, StreamWriterAdapter):
        return
    # No default: if amqtt renames it, this fails loudly instead of leaking every socket.
    stream = writer._writer
    if not isinstance(stream, asyncio.StreamWriter):
        raise TypeError(f"amqtt's StreamWriterAdapter._writer is a {type(stream).__name__}")
    if not stream.is_closing():
        stream.close()
