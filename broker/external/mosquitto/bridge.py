"""Keep Mosquitto's dynamic-security clients in step with the registry.

Two moments matter. When provisioning issues a password (after the commit, before the reply)
:meth:`DynsecBridge.issued` hands the plaintext to Mosquitto, which hashes it itself, and the
plaintext is forgotten. When a credential dies (reset, decommission, delete, account removal),
:meth:`DynsecBridge.follow` sees it on the registry's change feed and deletes or disables the
client, which makes Mosquitto disconnect its live sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from auth_plugin.principals import credential_tag
from broker.external.mosquitto.dynsec import Acl, DynsecClient, DynsecError
from broker.external.mosquitto.layout import (
    DEFAULT_ACCESS,
    WORKER_ROLE,
    account_acls,
    account_role,
    device_acls,
    device_namespace,
    device_role,
    marker,
    tag_of,
    worker_acls,
)
from config import Settings
from provisioning.contract import DEVICE_USERNAME_PREFIX
from provisioning.errors import ProvisioningError, RegistryUnavailableError
from provisioning.registry import ACTIVE_STATUSES, DeviceInfo, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.feed import ChangeFeed
from provisioning.registry.outage import OutageLog
from provisioning.topics import TopicRule

logger = logging.getLogger(__name__)


class DynsecBridge:
    """Mosquitto's side of every credential the registry issues or revokes."""

    def __init__(
        self,
        dynsec: DynsecClient,
        settings: Settings,
        *,
        devices: DeviceRegistry,
        accounts: AccountRegistry,
        interval: float = 0.5,
    ) -> None:
        self.dynsec = dynsec
        self.devices = devices
        self.accounts = accounts
        self._settings = settings
        self._external = settings.external
        self._interval = interval
        self.revoked = 0
        #: When the feed was last read and applied (``time.monotonic``; the creation time until then).
        self.read_at = time.monotonic()
        # Kept across restarts of :meth:`follow`: a restarted bridge resumes, it does not skip.
        self._feed = ChangeFeed(devices)
        self._database = OutageLog(logger)
        self._mosquitto = OutageLog(logger, subject="Mosquitto")

    @property
    def position(self) -> int | None:
        """The id of the newest change applied (None until the feed could first be read)."""
        return self._feed.position

    async def ensure_layout(self) -> None:
        """Deny-by-default access, the worker's role, and the worker's client (see below)."""
        await self.dynsec.set_default_acl_access(DEFAULT_ACCESS)
        await self._replace_role(WORKER_ROLE, worker_acls(self._external.shared_group))
        await self._ensure_worker_client()

    async def _ensure_worker_client(self) -> None:
        """Create the worker's client with its role, or say in one ERROR line why it cannot.

        Without it ``mqttprov worker`` is refused (Not authorized); the bridge still follows
        revocations, so it goes on after saying so.
        """
        name = self._external.worker_username
        client = await self.dynsec.get_client(name)
        secret = self._external.worker_password
        password = "" if secret is None else secret.get_secret_value()
        if client is None and not password:
            logger.error(
                "no worker client %r on Mosquitto and external.worker_password is not set: give "
                "this command the worker's password too (MQTTPROV_EXTERNAL__WORKER_PASSWORD) and "
                "start it again; until then `mqttprov worker` is refused (Not authorized)",
                name,
            )
            return
        if client is None:
            await self.dynsec.create_client(
                name,
                password,
                clientid=None,
                roles=[WORKER_ROLE],
                textname="mqttprov provisioning worker",
                textdescription="mqttprov worker",
            )
            logger.info("created the worker client %r on Mosquitto", name)
            return
        if WORKER_ROLE not in {role.rolename for role in client.roles}:
            await self.dynsec.call("addClientRole", username=name, rolename=WORKER_ROLE, priority=-1)
            logger.info("gave the worker client %r the role %r on Mosquitto", name, WORKER_ROLE)
        if client.disabled:
            # Only an operator disables it: enabling it again is their call.
            logger.error(
                "the worker client %r is disabled on Mosquitto: `mqttprov worker` is refused "
                "(Not authorized) until it is enabled (mosquitto_ctrl ... dynsec enableClient %s)",
                name,
                name,
            )

    # -- issuing ----------------------------------------------------------------------------------

    async def issued(self, device: DeviceInfo, password: str, password_hash: str) -> None:
        """Give Mosquitto a device's new password, bound to client id = username."""
        role = device_role(device.mqtt_username)
        await self._replace_role(role, device_acls(device_namespace(self._settings, device)))
        await self._put_client(
            device.mqtt_username,
            password,
            password_hash,
            clientid=device.mqtt_username,
            role=role,
            textname=f"device {device.mac}",
        )
        logger.info("credentials of device %s set on Mosquitto", device.mqtt_username)

    async def account_issued(
        self, name: str, rules: Sequence[TopicRule], password: str, password_hash: str
    ) -> None:
        """Give Mosquitto a service account's password and rules (refuses rules reaching provision/)."""
        acls = account_acls(rules)
        role = account_role(name)
        await self._replace_role(role, acls)
        # Accounts connect as NAME or NAME-<anything>: Mosquitto can bind one client id or none.
        await self._put_client(
            name, password, password_hash, clientid=None, role=role, textname=f"account {name}"
        )
        logger.info("credentials of service account %s set on Mosquitto", name)

    async def _put_client(
        self,
        username: str,
        password: str,
        password_hash: str,
        *,
        clientid: str | None,
        role: str,
        textname: str,
    ) -> None:
        description = marker(password_hash)
        try:
            await self.dynsec.create_client(
                username,
                password,
                clientid=clientid,
                roles=[role],
                textname=textname,
                textdescription=description,
            )
        except DynsecError as exc:
            if not exc.exists:
                raise
        else:
            return
        # Known already (a reissue, or a reset device enrolling again): the new password kicks
        # whoever still uses the old one.
        await self.dynsec.set_client_password(username, password)
        await self.dynsec.modify_client(
            username,
            clientid=clientid or "",
            textname=textname,
            textdescription=description,
            roles=[{"rolename": role, "priority": -1}],
        )
        await self.dynsec.enable_client(username)

    async def _replace_role(self, rolename: str, acls: list[Acl]) -> None:
        current = await self.dynsec.get_role_acls(rolename)
        if current is None:
            await self.dynsec.create_role(rolename, acls)
            return
        # Edited in place, never deleted and recreated: a role deleted is detached from its clients.
        for acl in set(current) - set(acls):
            await self.dynsec.call("removeRoleACL", rolename=rolename, acltype=acl.acltype, topic=acl.topic)
        for acl in set(acls) - set(current):
            await self.dynsec.call("addRoleACL", rolename=rolename, **acl.model_dump())

    # -- revoking ---------------------------------------------------------------------------------

    async def revoke(self, username: str) -> bool:
        """Delete or disable (``external.on_revoke``) a client; False when Mosquitto has none."""
        try:
            if self._external.on_revoke == "disable":
                await self.dynsec.disable_client(username)
            else:
                await self.dynsec.delete_client(username)
                await self._forget_role(username)
        except DynsecError as exc:
            if exc.not_found:
                return False
            raise
        self.revoked += 1
        logger.info("revoked %s on Mosquitto (%s)", username, self._external.on_revoke)
        return True

    async def _forget_role(self, username: str) -> None:
        for role in (device_role(username), account_role(username)):
            try:
                await self.dynsec.delete_role(role)
            except DynsecError as exc:
                if not exc.not_found:
                    raise

    async def current_tag(self, username: str) -> str | None:
        """The tag of the credential the registry holds for this username (None: no valid one)."""
        if username.startswith(DEVICE_USERNAME_PREFIX):
            record = await self.devices.find_credentials_by_username(username)
            if record is None or record.password_hash is None or record.device.status not in ACTIVE_STATUSES:
                return None
            return credential_tag(record.password_hash)
        account = await self.accounts.find(username)
        return None if account is None else credential_tag(account.password_hash)

    async def apply(self, usernames: set[str]) -> None:
        """Bring Mosquitto in line with these usernames' current credentials."""
        for username in sorted(usernames):
            tag = await self.current_tag(username)
            if tag is None:
                await self.revoke(username)
                continue
            if username.startswith(DEVICE_USERNAME_PREFIX):
                continue  # issued: the worker has set it, before the reply
            client = await self.dynsec.get_client(username)
            if client is not None and not client.disabled and tag_of(client.textdescription) != tag:
                # Rotated without the bridge: Mosquitto still holds the old password.
                await self.dynsec.disable_client(username)
                logger.warning(
                    "service account %s was rotated outside the bridge: disabled on Mosquitto "
                    "(use `mqttprov bridge accounts rotate %s`)",
                    username,
                    username,
                )

    async def follow(self, stop: asyncio.Event, *, since: int | None = None) -> None:
        """Follow the registry's change feed after change ``since`` (default: where it was, else
        the newest) until ``stop`` is set.

        Stopping between rounds, never by cancelling one: a query cut off mid-way would leave
        its database connection to the garbage collector. A round that fails (the database or
        Mosquitto away) is retried: the position only moves past changes applied.
        """
        if since is not None:
            self._feed.position = since
        logged = False
        while not stop.is_set():
            if await self._round() and not logged:
                logger.info("bridge following the credential change feed from change %d", self.position)
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def _round(self) -> bool:
        try:
            await self._feed.read(self.apply)
        except (RegistryUnavailableError, SQLAlchemyError, OSError) as exc:
            self._database.failed("bridge: revocations wait to reach Mosquitto", exc)
            return False
        except ProvisioningError as exc:
            self._database.succeeded()  # the feed was read: it is Mosquitto that failed
            self._mosquitto.failed("bridge: revocations wait to reach Mosquitto", exc)
            return False
        self._database.succeeded()
        self._mosquitto.succeeded()
        self.read_at = time.monotonic()
        return True


class BridgeFollower:
    """:meth:`DynsecBridge.follow` as a background loop for :class:`broker.core.Supervised`."""

    def __init__(self, bridge: DynsecBridge, *, since: int | None = None) -> None:
        self._bridge = bridge
        self._since = since
        self._stop = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Make :meth:`run` return after the round in progress."""
        self._stop.set()

    async def run(self) -> None:
        """Follow the feed until :meth:`request_stop` (a restart resumes where it was)."""
        since, self._since = self._since, None
        await self._bridge.follow(self._stop, since=since)
