"""Run the embedded amqtt broker with the registry behind it."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import TracebackType
from typing import Self

from amqtt.errors import BrokerError

from auth_plugin.authenticator import Authenticator
from broker.amqtt_broker import BrokerLink, MqttprovBroker
from broker.assembly import Listener, Services, amqtt_config, check_tls_files, listeners
from broker.errors import ServeError
from config import Settings
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.migrate import upgrade
from provisioning.service import ProvisioningService

logger = logging.getLogger(__name__)


class BrokerServer:
    """The running service: registry (migrated on start) plus amqtt listeners.

    Use as an async context manager; on entry every listener accepts connections.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._registry: DeviceRegistry | None = None
        self._broker: MqttprovBroker | None = None
        self._hasher: PasswordHasher | None = None
        self.listeners: list[Listener] = []

    @property
    def registry(self) -> DeviceRegistry:
        """The registry this server uses (valid while started)."""
        if self._registry is None:
            raise ServeError("the broker is not started")
        return self._registry

    @property
    def broker(self) -> MqttprovBroker:
        """The amqtt broker (valid while started)."""
        if self._broker is None:
            raise ServeError("the broker is not started")
        return self._broker

    async def start(self) -> None:
        """Migrate the registry and open every listener; :class:`ServeError` on failure."""
        for warning in self.settings.warnings():
            logger.warning("%s", warning)
        check_tls_files(self.settings.broker)
        engine = create_engine(self.settings.database.url, pool_size=self.settings.database.pool_size)
        registry = DeviceRegistry(engine)
        hasher = PasswordHasher(self.settings.auth.bcrypt_cost)
        link = BrokerLink()
        services = Services(
            authenticator=Authenticator(registry, hasher, self.settings),
            provisioning=ProvisioningService(registry, hasher, self.settings, sessions=link),
            sessions=link,
        )
        try:
            await upgrade(engine)
            broker = MqttprovBroker(
                amqtt_config(self.settings, services), connect_timeout=self.settings.broker.connect_timeout
            )
            link.broker = broker
            try:
                await broker.start()
            except BrokerError as exc:
                await broker.close_listeners()
                raise ServeError(f"cannot start the broker: {_root_cause(exc)}") from exc
        except BaseException:
            hasher.close()
            await registry.close()
            raise
        self._registry, self._broker, self._hasher = registry, broker, hasher
        self.listeners = listeners(self.settings.broker)
        for listener in self.listeners:
            logger.info("listening for %s on %s", listener.scheme, listener.bind)
        logger.info(
            "broker started; devices are told to connect to %s:%d",
            self.settings.broker.effective_advertised_host,
            self.settings.broker.effective_advertised_port,
        )

    async def stop(self) -> None:
        """Close every connection and listener, then dispose the registry's engine."""
        broker, registry, hasher = self._broker, self._registry, self._hasher
        self._broker = self._registry = self._hasher = None
        try:
            if broker is not None:
                await broker.shutdown()
        finally:
            if hasher is not None:
                hasher.close()
            if registry is not None:
                await registry.close()
        logger.info("broker stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or until ``stop`` is set), then shut down cleanly."""
    stop_event = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, _request_stop, stop_event, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread
            pass
    try:
        async with BrokerServer(settings):
            await stop_event.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    logger.info("received %s, shutting down", sig.name)
    stop.set()


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: amqtt wraps an OSError in two BrokerErrors."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc)
