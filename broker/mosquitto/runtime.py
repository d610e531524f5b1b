"""Assemble and run the Mosquitto side: the bridge, the provisioning worker, and sync.

Each entry point owns what it opens (database engine, bcrypt pool, MQTT links) and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from broker.mosquitto.bridge import DynsecBridge
from broker.mosquitto.dynsec import DynsecClient
from broker.mosquitto.sync import SyncReport, reconcile
from config import Settings
from provisioning.external.link import BrokerAddress, ExternalBrokerError, MqttLink, parse_broker_url
from provisioning.external.worker import ProvisioningWorker
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.service import ProvisioningService

logger = logging.getLogger(__name__)


def broker_address(settings: Settings, override: str | None) -> BrokerAddress:
    """``--broker`` if given, else ``external.broker``."""
    return parse_broker_url(override or settings.external.broker)


def _client_id(role: str) -> str:
    # Several bridges or workers may run at once: each session needs its own client id.
    return f"mqttprov-{role}-{os.getpid()}-{os.urandom(3).hex()}"


@contextlib.asynccontextmanager
async def open_bridge(settings: Settings, address: BrokerAddress) -> AsyncIterator[DynsecBridge]:
    """A connected :class:`DynsecBridge` over the registry, closed on exit."""
    external = settings.external
    secret = external.admin_password
    if secret is None or not secret.get_secret_value():
        raise ExternalBrokerError("external.admin_password is not set (MQTTPROV_EXTERNAL__ADMIN_PASSWORD)")
    engine = create_engine(settings.database.url, pool_size=settings.database.pool_size)
    devices, accounts = DeviceRegistry(engine), AccountRegistry(engine)
    try:
        link = MqttLink(
            address,
            client_id=_client_id("bridge"),
            username=address.username or external.admin_username,
            password=secret.get_secret_value(),
            ca_file=external.ca_file,
            timeout=external.request_timeout,
        )
        async with link:
            dynsec = DynsecClient(link, timeout=external.request_timeout)
            await dynsec.start()
            try:
                yield DynsecBridge(
                    dynsec,
                    settings,
                    devices=devices,
                    accounts=accounts,
                    interval=settings.auth.revocation_poll_interval,
                )
            finally:
                await dynsec.stop()
    finally:
        await engine.dispose()


async def run_bridge(
    settings: Settings, address: BrokerAddress, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """Set up the layout, then follow the change feed until ``stop`` (``ready`` set once set up)."""
    async with open_bridge(settings, address) as bridge:
        await bridge.ensure_layout()
        if ready is not None:
            ready.set()
        await bridge.follow(stop)


async def run_worker(
    settings: Settings, address: BrokerAddress, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """Serve ``provision/request`` on the external broker until ``stop`` (``ready``: subscribed)."""
    external = settings.external
    secret = external.worker_password
    if secret is None or not secret.get_secret_value():
        raise ExternalBrokerError("external.worker_password is not set (MQTTPROV_EXTERNAL__WORKER_PASSWORD)")
    proof = settings.provisioning.auth
    if proof == "device_key":
        # The worker never sees a session's login; Mosquitto cannot derive per-MAC keys.
        raise ExternalBrokerError(
            "provisioning.auth = 'device_key' cannot be enforced on an external broker: "
            "use 'none' or 'fleet_secret' (see docs/mosquitto.md)"
        )
    for warning in settings.warnings():
        logger.warning("%s", warning)
    if proof == "fleet_secret":
        logger.warning(
            "provisioning.auth is 'fleet_secret': only Mosquitto can check it (a password_file with "
            "user 'provision' on the provisioning listener); the worker cannot"
        )
    hasher = PasswordHasher(settings.auth.bcrypt_cost, workers=settings.auth.bcrypt_workers)
    try:
        async with open_bridge(settings, address) as bridge:
            service = ProvisioningService(bridge.devices, hasher, settings, credentials=bridge)
            link = MqttLink(
                address,
                client_id=_client_id("worker"),
                username=external.worker_username,
                password=secret.get_secret_value(),
                ca_file=external.ca_file,
                timeout=external.request_timeout,
            )
            async with link:
                worker = ProvisioningWorker(
                    link,
                    service,
                    shared_group=external.shared_group,
                    max_bytes=settings.provisioning.max_payload_bytes,
                    ready=ready,
                )
                await _until(stop, worker.run())
    finally:
        hasher.close()


async def sync(
    settings: Settings, address: BrokerAddress, *, dry_run: bool, grace: float = 10.0
) -> SyncReport:
    """One reconciliation (see :mod:`broker.mosquitto.sync`)."""
    async with open_bridge(settings, address) as bridge:
        if not dry_run:
            await bridge.ensure_layout()
        return await reconcile(bridge, dry_run=dry_run, grace=grace)


async def _until(stop: asyncio.Event, work: Awaitable[None]) -> None:
    """Run ``work`` until it ends (an error propagates) or ``stop`` is set."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, waiter):
            pending.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if task.done() and not task.cancelled():
        error = task.exception()
        if error is not None:
            raise error


async def until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGINT or SIGTERM sets ``stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
