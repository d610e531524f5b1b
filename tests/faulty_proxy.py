"""A TCP proxy that injects network faults between a client and a real server.

Modes, switched at any time with :meth:`FaultyProxy.set_mode`:

- ``pass``: bytes flow both ways;
- ``refuse``: the listening socket is closed, so new connections are refused, and open ones are
  cut (a database that went down);
- ``stall``: connections are accepted and bytes read, but nothing is forwarded either way until
  the mode changes (a dead host or a black-holed link: no error, no answer);

and :meth:`FaultyProxy.cut` resets every open connection at once (a restart, a NAT timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Literal, Self

Mode = Literal["pass", "refuse", "stall"]


class FaultyProxy:
    """Listens on a free loopback port and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False
        self.mode: Mode = "pass"
        self.port = 0
        #: Connections accepted so far, and how many of them reached the upstream server.
        self.accepted = 0
        self.forwarded = 0
        #: Bytes read while stalled (something is waiting on the stalled link).
        self.held = 0

    async def __aenter__(self) -> Self:
        await self._listen()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def set_mode(self, mode: Mode) -> None:
        """Switch to ``mode`` (see the module's docstring)."""
        self.mode = mode
        if mode == "stall":
            self._flowing.clear()
            return
        self._flowing.set()
        if mode == "refuse":
            await self._stop_listening()
        elif self._server is None:
            await self._listen()

    def cut(self) -> None:
        """Reset every open connection, both sides."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        """Stop listening, cut everything and let every handler end."""
        self._closed = True
        self._flowing.set()  # stalled handlers see they are closed
        await self._stop_listening()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _listen(self) -> None:
        # The same port again after a refusal: clients keep their URL.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        """Close the listening socket and cut every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Cut before waiting: since Python 3.12 wait_closed() also waits for the connections the
        # server accepted, which would never end while held open here.
        self.cut()
        if server is not None:
            await server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(client_writer)
        self.accepted += 1
        writers = [client_writer]
        try:
            # Stalled: accepted, and held without an answer (the client's first bytes stay unread
            # in the socket, so the wait itself counts as something held).
            if not self._flowing.is_set():
                self.held += 1
                await self._flowing.wait()
            if self._closed:
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                return
            writers.append(upstream_writer)
            self._writers.add(upstream_writer)
            self.forwarded += 1
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer)
            )
        finally:
            for writer in writers:
                self._writers.discard(writer)
                writer.transport.abort()
            self._handlers.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not self._flowing.is_set():
                    self.held += len(data)
                    await self._flowing.wait()  # stalled: the bytes are held, not dropped
                writer.write(data)
                await writer.drain()
        # One side ended: end the other too, as a real connection would.
        writer.transport.abort()
