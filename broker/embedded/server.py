"""Run the embedded amqtt broker with the registry behind it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from amqtt.errors import BrokerError
from prometheus_client import CollectorRegistry

from auth_plugin.presence import PresenceRecorder
from auth_plugin.revocation import Revoker
from broker.core import STOP_TIMEOUT, AuthCore, Supervised, auth_core, run_until_signalled
from broker.embedded.amqtt_broker import MqttprovBroker
from broker.embedded.assembly import (
    Listener,
    Services,
    amqtt_config,
    check_tls_files,
    listeners,
    topic_limits,
)
from broker.embedded.base import ConnectionLimits
from broker.embedded.control import BrokerLink
from broker.embedded.expiry import SessionExpiry
from broker.embedded.plugins.sessions import SessionHooks
from broker.errors import ServeError
from broker.metrics import (
    AuthenticatorCollector,
    BrokerCollector,
    HasherCollector,
    ProvisioningCollector,
    RevokerCollector,
    process_registry,
)
from config import Settings
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.outage import OutageLog
from provisioning.registry.presence import PresenceStore
from provisioning.registry.revisions import upgrade_if_behind
from provisioning.service import ProvisioningService

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    """Everything a started server owns, released in :meth:`BrokerServer.stop`."""

    core: AuthCore
    services: Services
    revoker: Revoker
    link: BrokerLink
    #: What ``/metrics`` reports: the collectors over the services above, and the process's.
    metrics: CollectorRegistry
    broker: MqttprovBroker | None = None
    #: Background loops, restarted should one die.
    loops: list[Supervised] = field(default_factory=list)


class BrokerServer:
    """The running service: registry (migrated on start), amqtt listeners and background tasks.

    Use as an async context manager; on entry every listener accepts connections. A listener
    asked for port 0 gets a free port from the OS; :attr:`settings` then holds the bound port.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._running: _Running | None = None
        self.listeners: list[Listener] = []

    def _state(self) -> _Running:
        if self._running is None or self._running.broker is None:
            raise ServeError("the broker is not started")
        return self._running

    @property
    def registry(self) -> DeviceRegistry:
        """The registry this server uses (valid while started)."""
        return self._state().core.registry

    @property
    def accounts(self) -> AccountRegistry:
        """The service-account registry (valid while started)."""
        return self._state().core.accounts

    @property
    def broker(self) -> MqttprovBroker:
        """The amqtt broker (valid while started)."""
        broker = self._state().broker
        assert broker is not None
        return broker

    @property
    def services(self) -> Services:
        """The services behind the plugins (valid while started)."""
        return self._state().services

    @property
    def metrics(self) -> CollectorRegistry:
        """The process's metrics (valid while started)."""
        return self._state().metrics

    def listening(self) -> bool:
        """True while started and every MQTT listener accepts connections."""
        running = self._running
        return running is not None and running.broker is not None and running.broker.listening()

    @property
    def hasher(self) -> PasswordHasher:
        """The bcrypt worker pool (valid while started)."""
        return self._state().core.hasher

    def _assemble(self) -> _Running:
        settings = self.settings
        core = auth_core(settings)
        registry, authenticator = core.registry, core.authenticator
        link = BrokerLink()
        interval = settings.auth.revocation_poll_interval
        # One story per outage for the whole process, whichever loop notices first.
        outage = OutageLog(logger)
        revoker = Revoker(
            registry, core.accounts, authenticator.cache, link, interval=interval, outage=outage
        )
        services = Services(
            authenticator=authenticator,
            provisioning=ProvisioningService(registry, core.hasher, settings, sessions=link),
            sessions=link,
            presence=PresenceRecorder(PresenceStore(registry.engine), outage=outage),
            revoker=revoker,
        )
        metrics = process_registry(
            AuthenticatorCollector(authenticator),
            HasherCollector(core.hasher),
            ProvisioningCollector(services.provisioning),
            RevokerCollector(revoker),
            BrokerCollector(link),
        )
        return _Running(core, services, revoker, link, metrics)

    async def start(self) -> None:
        """Migrate the registry and open every listener; :class:`ServeError` on failure."""
        for warning in self.settings.warnings():
            logger.warning("%s", warning)
        check_tls_files(self.settings.broker)
        running = self._assemble()
        try:
            await upgrade_if_behind(running.core.registry.engine)
            await running.services.presence.start_clean()
            await running.revoker.begin()
            # After the follower's position is taken: a change made from then on drops what it loads.
            await running.core.authenticator.warm_up()
            broker = MqttprovBroker(
                amqtt_config(self.settings, running.services),
                limits=ConnectionLimits(
                    connect_timeout=self.settings.broker.connect_timeout,
                    max_connections=self.settings.broker.max_connections,
                    max_connections_per_address=self.settings.broker.max_connections_per_address,
                    max_queued_messages=self.settings.broker.max_queued_messages,
                    max_packet_bytes=self.settings.broker.max_packet_bytes,
                    topics=topic_limits(self.settings.broker),
                ),
                session_hooks=SessionHooks(running.services.presence, running.revoker),
            )
            running.link.broker = broker
            try:
                await broker.start()
            except BrokerError as exc:
                await broker.close_listeners()
                raise ServeError(f"cannot start the broker: {_root_cause(exc)}") from exc
            running.broker = broker
        except BaseException:
            await running.core.close()
            raise
        running.loops = [
            Supervised("mqttprov-revocation", running.revoker).start(),
            Supervised("mqttprov-presence", running.services.presence).start(),
            Supervised("mqttprov-credential-pool", running.services.provisioning.pool).start(),
            Supervised(
                "mqttprov-session-expiry", SessionExpiry(running.link, self.settings.broker.session_expiry)
            ).start(),
        ]
        self._running = running
        self._resolve_ports(broker, running.services)
        self.listeners = listeners(self.settings.broker)
        for listener in self.listeners:
            logger.info("listening for %s on %s", listener.scheme, listener.bind)
        logger.info(
            "broker started; devices are told to connect to %s:%d",
            self.settings.broker.effective_advertised_host,
            self.settings.broker.effective_advertised_port,
        )

    def _resolve_ports(self, broker: MqttprovBroker, services: Services) -> None:
        """Replace every port 0 in :attr:`settings` by the port its listener bound.

        From then on ``settings.broker.port`` (and ``tls_port``, ``ws_port``) is where the broker
        listens, and devices are told that port unless ``advertised_port`` says otherwise.
        """
        section = self.settings.broker
        bound = {
            listener.setting: broker.bound_port(listener.name)
            for listener in listeners(section)
            if listener.port == 0
        }
        if not bound:
            return
        resolved = section.model_copy(update=bound)
        self.settings = self.settings.model_copy(update={"broker": resolved})
        services.provisioning.advertise(resolved)

    async def stop(self) -> None:
        """Close every connection and listener, write pending presence, dispose the engine.

        Bounded even with the database stalled (docs/operations/database-faults.md): each step
        that waits for the database gives up after :data:`STOP_TIMEOUT` seconds.
        """
        running, self._running = self._running, None
        if running is None:
            return
        try:
            if running.broker is not None:
                await running.broker.shutdown()
        finally:
            await asyncio.gather(*(loop.stop() for loop in running.loops))
            try:
                await asyncio.wait_for(running.services.presence.flush(), STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("last presence batch not written: the database did not answer")
            finally:
                await running.core.close()
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


@contextlib.asynccontextmanager
async def with_metrics(server: BrokerServer) -> AsyncIterator[str | None]:
    """Run ``server``, and with ``[metrics] port`` set a ``/metrics`` listener beside it (for a
    ``serve`` without the API, whose port answers ``/metrics`` otherwise); yields its URL."""
    async with server:
        if server.settings.metrics.port is None:
            yield None
            return
        from broker.http.metrics import metrics_listener  # noqa: PLC0415 - aiohttp only when asked

        async with metrics_listener(server.settings.metrics, server.metrics) as url:
            yield url


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or until ``stop`` is set), then shut down cleanly."""
    await run_until_signalled(with_metrics(BrokerServer(settings)), stop)


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: amqtt wraps an OSError in two BrokerErrors."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc)
