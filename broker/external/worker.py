"""The provisioning worker on an external broker, whatever the broker: assembly and lifetime.

``[external] credentials`` says where a device's new password must go before its reply:

- ``"registry"``: nowhere else. The broker asks ``mqttprov authd`` (RabbitMQ, EMQX, VerneMQ,
  Mosquitto with mosquitto-go-auth), which checks the registry's bcrypt hash itself. The worker
  opens the registry (``database.url``) and needs no broker administrator.
- ``"mosquitto"``: Mosquitto's dynamic security, which hashes passwords itself, must be told the
  password through the bridge (:func:`broker.external.mosquitto.runtime.run_mosquitto_worker`).

Each entry point owns what it opens (database engine, bcrypt pool, MQTT link) and closes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable

from auth_plugin.acl import Action
from auth_plugin.principals import AccountPrincipal
from broker.metrics import HasherCollector, ProvisioningCollector, process_registry
from config import Settings
from provisioning.contract import EVENT_PREFIX, REPLY_PREFIX, REQUEST_TOPIC, event_topic
from provisioning.external.link import BrokerAddress, ExternalBrokerError, MqttLink, parse_broker_url
from provisioning.external.worker import ProvisioningWorker, request_filter
from provisioning.passwords import PasswordHasher
from provisioning.ports import CredentialSink
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountError, AccountRegistry, validate_account_name
from provisioning.service import ProvisioningService

logger = logging.getLogger(__name__)

Runner = Callable[[Settings, BrokerAddress, asyncio.Event, asyncio.Event | None], Awaitable[None]]


def broker_address(settings: Settings, override: str | None) -> BrokerAddress:
    """``--broker`` if given, else ``external.broker``."""
    return parse_broker_url(override or settings.external.broker)


def service_client_id(name: str) -> str:
    """``NAME-<pid>-<random>``: several workers or bridges may run, each needs a client id of its own.

    authd accepts a service account's session only with client id ``NAME`` or ``NAME-<anything>``.
    """
    return f"{name}-{os.getpid()}-{os.urandom(3).hex()}"


def check_worker_settings(settings: Settings) -> None:
    """Refuse (:class:`ExternalBrokerError`) what this worker cannot run or nobody can enforce.

    The worker is an ordinary subscriber: it never sees the login of the session that published
    a request. A proof (``provisioning.auth``) is therefore checked by whoever sees the login:

    - ``credentials = "registry"``: ``mqttprov authd`` checks ``fleet_secret`` and ``device_key``
      (the key derived from the MAC that is the session's client id) when the provisioning
      session logs in, and lets only that session read its reply topic. What nobody can check is
      that the MAC *named in a request* is the publisher's own (authd sees topics, not payloads),
      so a holder of one device key could make the worker issue for another MAC. The reply stays
      private, but with ``reprovision = "reissue"`` that would revoke the other device's working
      password, which is what ``device_key`` exists to prevent: that combination is refused.
    - ``credentials = "mosquitto"``: Mosquitto cannot derive per-MAC keys, so ``device_key`` is
      refused; ``fleet_secret`` only with a Mosquitto password file (warned).
    """
    external, proof = settings.external, settings.provisioning
    secret = external.worker_password
    if secret is None or not secret.get_secret_value():
        raise ExternalBrokerError("external.worker_password is not set (MQTTPROV_EXTERNAL__WORKER_PASSWORD)")
    if external.credentials == "mosquitto":
        if proof.auth == "device_key":
            raise ExternalBrokerError(
                "provisioning.auth = 'device_key' cannot be enforced on Mosquitto: "
                "use 'none' or 'fleet_secret' (see docs/mosquitto.md)"
            )
        return
    try:
        validate_account_name(external.worker_username)
    except AccountError as exc:
        raise ExternalBrokerError(
            f"external.worker_username {external.worker_username!r} is not a service account name "
            "(letters, digits, '_' or '.'): with credentials = 'registry' the worker logs in as an "
            "account of 'mqttprov accounts add', e.g. 'mqttprov_worker'"
        ) from exc
    if proof.auth == "device_key" and proof.reprovision == "reissue":
        raise ExternalBrokerError(
            "provisioning.auth = 'device_key' with reprovision = 'reissue' cannot be enforced on an "
            "external broker: a request's MAC is not bound to its sender, so one device key could "
            "revoke other devices' passwords; use reprovision = 'reject' (see docs/scaling-out.md)"
        )


def _worker_needs(shared_group: str) -> list[tuple[Action, str, str]]:
    # What the worker does on the broker: (action, a topic or filter it uses, the rule granting it).
    return [
        (Action.SUBSCRIBE, request_filter(shared_group), f"subscribe {REQUEST_TOPIC}"),
        (Action.PUBLISH, REPLY_PREFIX + "02:00:00:00:00:00", f"publish {REPLY_PREFIX}+"),
        (Action.PUBLISH, event_topic(uuid.UUID(int=0)), f"publish {EVENT_PREFIX}+"),
    ]


async def check_worker_account(accounts: AccountRegistry, settings: Settings) -> None:
    """Refuse to start unless the worker's service account may do what the worker does.

    authd decides by the account's rules in the registry; a worker whose enrolment event or reply
    is refused would be disconnected mid-request instead (RabbitMQ closes the connection).
    """
    name = settings.external.worker_username
    found = await accounts.find(name)
    needs = _worker_needs(settings.external.shared_group)
    wanted = " ".join(f'--allow "{rule}"' for _, _, rule in needs)
    if found is None:
        raise ExternalBrokerError(
            f"no service account {name!r} in the registry: mqttprov accounts add {name} {wanted}"
        )
    # Imported here, not at the top: the auth_plugin.authd package loads aiohttp (~10 MB), which
    # neither the worker, the bridge nor `mqttprov serve` (whose CLI loads this module) uses.
    from auth_plugin.authd.policy import external_allows  # noqa: PLC0415

    rules = found.account.allow
    principal = AccountPrincipal(
        name=name,
        subscribe=tuple(r.filter for r in rules if r.action == "subscribe"),
        publish=tuple(r.filter for r in rules if r.action == "publish"),
        tag="",
    )
    missing = [rule for action, topic, rule in needs if not external_allows(principal, topic, action)]
    if missing:
        raise ExternalBrokerError(
            f"service account {name!r} lacks {', '.join(repr(rule) for rule in missing)}: "
            f"the worker needs {wanted}"
        )


async def serve_provisioning(
    settings: Settings,
    address: BrokerAddress,
    devices: DeviceRegistry,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    *,
    credentials: CredentialSink | None = None,
) -> None:
    """Serve ``provision/request`` until ``stop`` (``ready``: subscribed); settings already checked.

    ``credentials`` receives each new password before its reply (None: the broker asks authd).
    """
    external = settings.external
    secret = external.worker_password
    assert secret is not None  # check_worker_settings ran
    # aiohttp only when a worker runs: the CLI imports this module for every bridge command.
    from broker.http.metrics import metrics_listener  # noqa: PLC0415

    hasher = PasswordHasher(settings.auth.bcrypt_cost, workers=settings.auth.bcrypt_workers)
    try:
        service = ProvisioningService(devices, hasher, settings, credentials=credentials)
        metrics = process_registry(HasherCollector(hasher), ProvisioningCollector(service))
        link = MqttLink(
            address,
            client_id=service_client_id(external.worker_username),
            username=external.worker_username,
            password=secret.get_secret_value(),
            ca_file=external.ca_file,
            timeout=external.request_timeout,
        )
        async with metrics_listener(settings.metrics, metrics), link:
            worker = ProvisioningWorker(
                link,
                service,
                shared_group=external.shared_group,
                max_bytes=settings.provisioning.max_payload_bytes,
                ready=ready,
            )
            await until(stop, worker.run())
    finally:
        hasher.close()


def log_startup(settings: Settings) -> None:
    """The operator warnings of these settings, and who checks the provisioning proof."""
    for warning in settings.warnings():
        logger.warning("%s", warning)
    proof = settings.provisioning.auth
    if settings.external.credentials == "mosquitto":
        if proof == "fleet_secret":
            logger.warning(
                "provisioning.auth is 'fleet_secret': only Mosquitto can check it (a password_file "
                "with user 'provision' on the provisioning listener); the worker cannot"
            )
        return
    if proof != "none":
        logger.info(
            "provisioning.auth is %r: checked by mqttprov authd at the provisioning session's login "
            "(give authd the same [provisioning] settings); the worker cannot see logins",
            proof,
        )
    if proof == "device_key":
        logger.warning(
            "provisioning.auth is 'device_key' on an external broker: a request may name another "
            "MAC than its sender's; its reply stays private, but it may enrol that MAC"
        )


async def run_registry_worker(
    settings: Settings, address: BrokerAddress, stop: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """``credentials = "registry"``: serve provisioning over the registry alone until ``stop``.

    For brokers whose logins ``mqttprov authd`` checks: no hand-over, no administrator login.
    """
    if settings.external.credentials != "registry":
        raise ExternalBrokerError(
            f"external.credentials is {settings.external.credentials!r}: this worker serves 'registry'"
        )
    check_worker_settings(settings)
    log_startup(settings)
    engine = create_engine(settings.database.url, pool_size=settings.database.pool_size)
    try:
        await check_worker_account(AccountRegistry(engine), settings)
        await serve_provisioning(settings, address, DeviceRegistry(engine), stop, ready)
    finally:
        await engine.dispose()


async def until(stop: asyncio.Event, work: Awaitable[None]) -> None:
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
