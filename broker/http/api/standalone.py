"""``mqttprov api``: the management API in a process of its own, beside authd or a broker.

It shares the registry (and so the change feed) with every other process: a decommission here
is thrown off by the process that holds the device's session. It hosts no MQTT sessions, so it
follows no feed itself, and announces no enrolment events.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from broker.core import Supervised, run_until_signalled
from broker.errors import ServeError
from broker.http.api.app import create_app
from broker.http.api.context import ApiServices
from broker.http.api.server import ApiServer
from broker.http.console.app import announce_console
from broker.metrics import HasherCollector, ProvisioningCollector, process_registry
from config import Settings
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.revisions import upgrade_if_behind
from provisioning.registry.tokens import TokenStore
from provisioning.service import ProvisioningService

logger = logging.getLogger(__name__)


def build_services(settings: Settings) -> ApiServices:
    """The API's services on one engine and one bcrypt pool (nothing is connected yet)."""
    engine = create_engine(settings.database.url, pool_size=settings.database.pool_size)
    registry = DeviceRegistry(engine)
    hasher = PasswordHasher(settings.auth.bcrypt_cost, workers=settings.auth.bcrypt_workers)
    provisioning = ProvisioningService(registry, hasher, settings)
    return ApiServices(
        settings=settings,
        registry=registry,
        accounts=AccountRegistry(engine),
        hasher=hasher,
        provisioning=provisioning,
        tokens=TokenStore(engine),
        metrics=process_registry(HasherCollector(hasher), ProvisioningCollector(provisioning)),
    )


@dataclass
class _Running:
    services: ApiServices
    pool: Supervised
    server: ApiServer


class StandaloneApi:
    """The API, its services and their background loop; an async context manager.

    Asked for ``[api] port = 0``, :attr:`settings` holds the bound port once started.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._running: _Running | None = None

    def _state(self) -> _Running:
        if self._running is None:
            raise ServeError("the API is not started")
        return self._running

    @property
    def url(self) -> str:
        """Base URL of the API (valid while started)."""
        return self._state().server.url

    @property
    def services(self) -> ApiServices:
        """The services behind the routes (valid while started)."""
        return self._state().services

    async def start(self) -> None:
        """Migrate the registry if it is behind, then open the port."""
        services = build_services(self.settings)
        try:
            await upgrade_if_behind(services.registry.engine)
            server = ApiServer(create_app(services), self.settings.api)
            await server.start()
        except BaseException:
            await _close(services)
            raise
        self.settings = self.settings.model_copy(update={"api": server.settings})
        services.provisioning.advertise(self.settings.broker)
        pool = Supervised("mqttprov-api-credential-pool", services.provisioning.pool).start()
        self._running = _Running(services, pool, server)
        await announce_console(server.url, services)

    async def stop(self) -> None:
        """Close the port, stop the pool, release the bcrypt workers and the engine."""
        running, self._running = self._running, None
        if running is None:
            return
        try:
            await running.server.stop()
        finally:
            await running.pool.stop()
            await _close(running.services)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _close(services: ApiServices) -> None:
    services.hasher.close()
    await services.registry.close()


async def run_api(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the API until SIGINT/SIGTERM (or until ``stop`` is set), then shut down cleanly."""
    await run_until_signalled(StandaloneApi(settings), stop)
