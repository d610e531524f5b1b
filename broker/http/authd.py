"""Run ``mqttprov authd``: the HTTP auth service over the registry, with its change-feed follower."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from auth_plugin.authd import (
    AuthdRevoker,
    AuthdService,
    CommandKicker,
    Contract,
    Metrics,
    PrincipalCache,
    emqx,
    goauth,
    rabbitmq,
    vernemq,
)
from auth_plugin.authd.app import build_app
from broker.core import AuthCore, Supervised, auth_core, run_until_signalled
from broker.errors import ServeError
from broker.metrics import (
    AuthdCollector,
    AuthenticatorCollector,
    HasherCollector,
    RevokerCollector,
    process_registry,
)
from config import AuthdSettings, Settings
from provisioning.errors import RegistryUnavailableError
from provisioning.registry.outage import OutageLog

logger = logging.getLogger(__name__)


def enabled_contracts(service: AuthdService, settings: AuthdSettings) -> list[Contract]:
    """The contracts ``[authd] contracts`` enables, in that order."""
    builders = {
        "rabbitmq": lambda: rabbitmq.routes(service, vhost=settings.rabbitmq_vhost),
        "emqx": lambda: emqx.routes(service),
        "vernemq": lambda: vernemq.routes(service),
        "goauth": lambda: goauth.routes(service),
    }
    return [builders[name]() for name in settings.contracts]


def tls_context(settings: AuthdSettings) -> ssl.SSLContext | None:
    """The HTTPS context ``[authd] tls_*`` asks for (client certificates required with a CA)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            context.load_verify_locations(cafile=settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise ServeError(f"authd.tls_*: cannot load the certificate, key or client CA: {exc}") from exc
    return context


def authd_warnings(settings: AuthdSettings) -> list[str]:
    """What an operator should hear about before the service starts."""
    if settings.tls_client_ca is not None:
        return []
    if settings.shared_secret is not None and settings.shared_secret.get_secret_value():
        return []
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    where = "on loopback only" if loopback else f"to anyone who reaches {settings.host}"
    return [f"authd.shared_secret is not set: authd answers {where}"]


@dataclass
class _Running:
    core: AuthCore
    service: AuthdService
    revoker: AuthdRevoker
    runner: web.AppRunner
    follower: Supervised


class AuthdServer:
    """The running auth service; an async context manager, accepting requests on entry.

    Asked for ``port = 0``, it listens on a free port the OS picks; :attr:`settings` and
    :attr:`url` then hold that port.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._running: _Running | None = None
        #: What ``/metrics`` reports (set at start).
        self.metrics: CollectorRegistry | None = None

    @property
    def service(self) -> AuthdService:
        """The decisions behind the routes (valid while started)."""
        if self._running is None:
            raise ServeError("authd is not started")
        return self._running.service

    @property
    def url(self) -> str:
        """Base URL of the service."""
        section = self.settings.authd
        host = f"[{section.host}]" if ":" in section.host else section.host
        scheme = "https" if section.tls_cert is not None else "http"
        return f"{scheme}://{host}:{section.port}"

    async def start(self) -> None:
        """Open the port and follow the change feed; :class:`ServeError` when the port is taken."""
        section = self.settings.authd
        for warning in authd_warnings(section):
            logger.warning("%s", warning)
        tls = tls_context(section)
        core = auth_core(self.settings, answer_within=self.settings.authd.request_timeout)
        metrics = Metrics(core.authenticator.stats, core.hasher)
        cache = PrincipalCache()
        # One story per outage for the whole process: requests tell it starts, the follower ends it.
        outage = OutageLog(logger)
        service = AuthdService(core.authenticator, metrics, cache, outage=outage)
        kicker = None
        if section.kick_command:
            kicker = CommandKicker(section.kick_command, timeout=section.kick_timeout)
        revoker = AuthdRevoker(
            core.registry,
            core.accounts,
            core.authenticator,
            cache,
            kicker,
            interval=self.settings.auth.revocation_poll_interval,
            outage=outage,
        )
        # The follower rides out the database being away (at start too) by itself. The verifiers
        # are loaded after its position is taken, and before the port opens: the first logins a
        # restarted authd answers come from memory, as the warm ones did before it stopped.
        with contextlib.suppress(RegistryUnavailableError):
            await revoker.begin()
        await core.authenticator.warm_up()
        self.metrics = process_registry(
            AuthdCollector(metrics, kicker),
            AuthenticatorCollector(core.authenticator),
            HasherCollector(core.hasher),
            RevokerCollector(revoker),
        )
        app = build_app(
            section,
            enabled_contracts(service, section),
            metrics,
            core.registry.last_change_id,
            make_aiohttp_handler(self.metrics),
        )
        # No access log: the query string of a badly configured broker could carry a secret.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, section.host, section.port, ssl_context=tls).start()
        except OSError as exc:
            await runner.cleanup()
            await core.close()
            raise ServeError(f"authd cannot listen on {section.host}:{section.port}: {exc}") from exc
        if section.port == 0:
            # Asked for any free port: from now on settings (and url) hold the one bound.
            section = section.model_copy(update={"port": runner.addresses[0][1]})
            self.settings = self.settings.model_copy(update={"authd": section})
        follower = Supervised("mqttprov-authd-revocation", revoker).start()
        self._running = _Running(core, service, revoker, runner, follower)
        logger.info("authd listening on %s (contracts: %s)", self.url, ", ".join(section.contracts))

    async def stop(self) -> None:
        """Stop answering, stop following the feed, release the pool and the engine."""
        running, self._running = self._running, None
        if running is None:
            return
        await running.follower.stop()
        try:
            await running.runner.cleanup()
        finally:
            await running.core.close()
        logger.info("authd stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def run_authd(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or until ``stop`` is set), then shut down cleanly."""
    await run_until_signalled(AuthdServer(settings), stop)
