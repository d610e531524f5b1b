"""Assemble and run the Mosquitto side: the bridge, the worker's hand-over to it, and sync.

Each entry point owns what it opens (database engine, MQTT links) and closes it. What a
provisioning worker does on any broker is in :mod:`broker.external.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from broker.core import Supervised
from broker.external.mosquitto.bridge import BridgeFollower, DynsecBridge
from broker.external.mosquitto.dynsec import DynsecClient
from broker.external.mosquitto.layout import check_external_rules
from broker.external.mosquitto.sync import SyncReport, reconcile
from broker.external.worker import (
    check_worker_settings,
    log_startup,
    serve_provisioning,
    service_client_id,
)
from broker.metrics import BridgeCollector, process_registry
from config import Settings
from provisioning.external.link import BrokerAddress, ExternalBrokerError, MqttLink
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountInfo, AccountNotFoundError, AccountRegistry
from provisioning.topics import TopicRule

logger = logging.getLogger(__name__)


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
            client_id=service_client_id("mqttprov-bridge"),
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
    """Set up the layout, catch up, then follow the change feed until ``stop`` (``ready`` set once
    caught up).

    Catching up: revocations made while no bridge ran (a device decommissioned, an account
    removed) are in the change feed *before* where following starts, so every client the registry
    no longer backs is disabled first. Devices Mosquitto lost are left to ``bridge sync``, which
    resets them: that is the operator's call.
    """
    async with open_bridge(settings, address) as bridge:
        await bridge.ensure_layout()
        since = await bridge.devices.last_change_id()
        caught_up = await reconcile(bridge, reset_devices=False)
        if caught_up.steps:
            logger.info(
                "bridge start: disabled %d client(s) the registry no longer backs", len(caught_up.steps)
            )
        # aiohttp only when the bridge runs: the CLI imports this module for every bridge command.
        from broker.http.metrics import metrics_listener  # noqa: PLC0415

        # Supervised: a follower that dies anyway is logged with its traceback and restarted.
        follower = Supervised("mqttprov-bridge-follower", BridgeFollower(bridge, since=since)).start()
        try:
            async with metrics_listener(settings.metrics, process_registry(BridgeCollector(bridge))):
                if ready is not None:
                    ready.set()
                await stop.wait()
        finally:
            await follower.stop()


async def run_mosquitto_worker(
    settings: Settings, address: BrokerAddress, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """``credentials = "mosquitto"``: serve provisioning, handing each password to Mosquitto first."""
    if settings.external.credentials != "mosquitto":
        raise ExternalBrokerError(
            f"external.credentials is {settings.external.credentials!r}: this worker serves 'mosquitto'"
        )
    check_worker_settings(settings)
    log_startup(settings)
    async with open_bridge(settings, address) as bridge:
        await serve_provisioning(settings, address, bridge.devices, stop, ready, credentials=bridge)


async def sync(
    settings: Settings, address: BrokerAddress, *, dry_run: bool, grace: float = 10.0
) -> SyncReport:
    """One reconciliation (see :mod:`broker.external.mosquitto.sync`)."""
    async with open_bridge(settings, address) as bridge:
        if not dry_run:
            await bridge.ensure_layout()
        return await reconcile(bridge, dry_run=dry_run, grace=grace)


async def add_account(
    settings: Settings,
    address: BrokerAddress,
    name: str,
    *,
    rules: list[TopicRule],
    password: str,
    password_hash: str,
) -> AccountInfo:
    """A service account in the registry, then on Mosquitto (rules reaching provision/ refused first)."""
    check_external_rules(rules)
    async with open_bridge(settings, address) as bridge:
        account = await bridge.accounts.add(name, password_hash, rules)
        await bridge.account_issued(name, rules, password, password_hash)
        return account


async def rotate_account(
    settings: Settings, address: BrokerAddress, name: str, password: str, password_hash: str
) -> AccountInfo:
    """A service account's new password on Mosquitto, then in the registry (old sessions kicked)."""
    async with open_bridge(settings, address) as bridge:
        found = await bridge.accounts.find(name)
        if found is None:
            raise AccountNotFoundError(f"no service account named {name!r}")
        # Mosquitto first: the bridge then sees the registry's change already matched there.
        await bridge.account_issued(name, list(found.account.allow), password, password_hash)
        return await bridge.accounts.rotate(name, password_hash)
