"""Host the API with uvicorn inside the caller's event loop.

uvicorn's own ``serve()`` would install signal handlers and report a bind failure with
``sys.exit``; here the socket is bound first (a taken port is a :class:`ServeError`, port 0 is
read back), uvicorn's startup is awaited, so entering :class:`ApiServer` returns once requests
are accepted, and its shutdown is awaited on exit. uvicorn's logging is left as the process set
it up (``log_config=None``), with no access log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import FastAPI

from broker.errors import ServeError
from config.models import ApiSettings

logger = logging.getLogger(__name__)

#: Seconds requests still running at shutdown get to finish before they are cancelled.
GRACEFUL_SHUTDOWN = 5


def tls_context(settings: ApiSettings) -> ssl.SSLContext | None:
    """The HTTPS context ``[api] tls_cert`` and ``tls_key`` ask for (None: plain HTTP)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ServeError(f"api.tls_cert/tls_key: cannot load the certificate or key: {exc}") from exc
    return context


class ApiListenError(ServeError):
    """The API's port cannot be bound; the message names the setting to change."""

    #: ``mqttprov serve`` adds no hint of its own (it would name the broker's ports).
    names_setting = True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (
                " (set another: [api] port in the config file or MQTTPROV_API__PORT; "
                "[api] enabled = false serves no API)"
            )
        raise ApiListenError(f"the API cannot listen on {host}:{port}: {exc}{hint}") from exc


class ApiServer:
    """The API listening on ``[api] host`` and ``port``; an async context manager.

    Asked for port 0, it listens on a free port the OS picks: :attr:`settings` and :attr:`url`
    then hold that port.
    """

    def __init__(self, app: FastAPI, settings: ApiSettings) -> None:
        self.app = app
        self.settings = settings
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Base URL of the API."""
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        scheme = "https" if self.settings.tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.settings.port}"

    async def start(self) -> None:
        """Bind, start uvicorn and return once it accepts requests; :class:`ServeError` on failure."""
        context = tls_context(self.settings)
        sock = _bind(self.settings.host, self.settings.port)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",  # the host starts and stops the services, not the app
            ws="none",
            proxy_headers=False,  # the client address is the peer's: rate limits count by it
            server_header=False,
            limit_concurrency=self.settings.max_connections,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
            ssl_context_factory=None if context is None else (lambda _config, _default: context),
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server, self._socket = server, sock
        self._main = asyncio.get_running_loop().create_task(server.main_loop(), name="mqttprov-api")
        if self.settings.port == 0:
            self.settings = self.settings.model_copy(update={"port": sock.getsockname()[1]})
        logger.info("api listening on %s", self.url)

    async def stop(self) -> None:
        """Stop accepting, let running requests finish (at most :data:`GRACEFUL_SHUTDOWN` s)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        limits = getattr(self.app.state, "limits", None)
        if limits is not None:  # event streams end now rather than hold the shutdown
            limits.streams.closing.set()
        if self._main is not None:
            await self._main
        await server.shutdown(sockets=[self._socket] if self._socket is not None else None)
        logger.info("api stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
