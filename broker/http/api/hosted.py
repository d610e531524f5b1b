"""``mqttprov serve`` with ``[api] enabled``: the API beside the embedded broker, in its process.

The API works on the broker's own services: one engine, one bcrypt pool, one provisioning
service (rate limits shared by both transports), and the broker's link, so a device enrolled
over HTTP is announced on the events topic like one enrolled over MQTT. A change made through
the API reaches the broker's revocation follower at once (same engine), not at its next poll.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from broker.core import run_until_signalled
from broker.embedded import BrokerServer
from broker.http.api.app import create_app
from broker.http.api.context import ApiServices
from broker.http.api.server import ApiServer
from broker.http.console.app import announce_console
from config import Settings
from provisioning.registry.tokens import TokenStore


class BrokerWithApi:
    """The embedded broker and, once it accepts connections, the API; an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self.broker = BrokerServer(settings)
        self._api: ApiServer | None = None

    @property
    def api(self) -> ApiServer:
        """The API's server (valid while started): its ``url`` and bound ``settings``."""
        if self._api is None:
            raise RuntimeError("the API is not started")
        return self._api

    async def start(self) -> None:
        """Start the broker, then open the API's port on its services."""
        await self.broker.start()
        broker = self.broker
        services = ApiServices(
            settings=broker.settings,
            registry=broker.registry,
            accounts=broker.accounts,
            hasher=broker.hasher,
            provisioning=broker.services.provisioning,
            tokens=TokenStore(broker.registry.engine),
            announce=broker.services.sessions.announce,
            metrics=broker.metrics,
            listening=broker.listening,
        )
        api = ApiServer(create_app(services), broker.settings.api)
        try:
            await api.start()
        except BaseException:
            await broker.stop()
            raise
        self._api = api
        await announce_console(api.url, services)

    async def stop(self) -> None:
        """Close the API first (no request outlives the services), then the broker."""
        api, self._api = self._api, None
        try:
            if api is not None:
                await api.stop()
        finally:
            await self.broker.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve_with_api(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """As :func:`broker.embedded.serve`, with the API: until SIGINT/SIGTERM (or ``stop``)."""
    await run_until_signalled(BrokerWithApi(settings), stop)
