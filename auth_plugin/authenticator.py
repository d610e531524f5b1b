"""The CONNECT decision: device login, service account, provisioning session, or refusal."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import bcrypt

from auth_plugin.acl import Action, allows
from auth_plugin.cache import VerifiedCache
from auth_plugin.principals import (
    BAD_USERNAME_OR_PASSWORD,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    AccountPrincipal,
    DevicePrincipal,
    Principal,
    ProvisioningPrincipal,
    credential_tag,
)
from auth_plugin.throttle import LoginThrottle, ThrottlePolicy
from config import Settings
from provisioning.contract import PROVISION_USERNAME, identity_from_client_id
from provisioning.keys import derive_device_key, secrets_match
from provisioning.passwords import PasswordHasher
from provisioning.registry import ACTIVE_STATUSES, Actor, DeviceInfo, DeviceRegistry
from provisioning.registry.accounts import AccountCredentials, AccountRegistry
from provisioning.topics import validate_filter

logger = logging.getLogger(__name__)

DEVICE_USERNAME_PREFIX = "device_"
# bcrypt's own base-64 alphabet and the length of the digest after the 29-character salt.
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_DIGEST_CHARS = 31


@dataclass(frozen=True)
class ConnectAttempt:
    """What a CONNECT presented."""

    client_id: str | None
    username: str | None
    password: str | None
    will_flag: bool = False
    address: str | None = None
    will_topic: str | None = None


@dataclass(frozen=True)
class Decision:
    """The principal to bind on success, or why not (for the log; never sent to the client)."""

    principal: Principal | None
    reason: str
    #: CONNACK code for a refusal: 4 wrong credentials, 3 overloaded, 5 everything else.
    code: int = NOT_AUTHORIZED

    @property
    def accepted(self) -> bool:
        """True when the CONNECT may proceed."""
        return self.principal is not None


_Check = Callable[[ConnectAttempt, str], Awaitable[Decision]]


@dataclass
class AuthStats:
    """Counters for operators, tests and the benchmark."""

    bcrypt_checks: int = 0
    cache_hits: int = 0
    overload_refusals: int = 0
    refusals: dict[str, int] = field(default_factory=dict)


def device_namespace(template: str, device: DeviceInfo) -> str:
    """The device's one topic filter: ``[acl] device_template`` with its own values filled in."""
    # Ids, usernames and canonical MACs contain no '+', '#' or '/', so nothing can be injected.
    return validate_filter(
        template.format(device_id=device.id, username=device.mqtt_username, mac=device.mac)
    )


def _account_principal(record: AccountCredentials, tag: str) -> AccountPrincipal:
    rules = record.account.allow
    return AccountPrincipal(
        name=record.account.name,
        subscribe=tuple(r.filter for r in rules if r.action == "subscribe"),
        publish=tuple(r.filter for r in rules if r.action == "publish"),
        tag=tag,
    )


def _account_client_id(name: str, client_id: str) -> bool:
    """A service account connects as NAME or NAME-<anything> (several connections per back end)."""
    return client_id == name or client_id.startswith(name + "-")


def _will_allowed(principal: Principal, attempt: ConnectAttempt) -> bool:
    topic = attempt.will_topic
    if not topic or "+" in topic or "#" in topic:
        return False  # a will topic is a topic name: no wildcards [MQTT-3.3.2-2]
    return allows(principal, topic, Action.PUBLISH)


class Authenticator:
    """Decide who a CONNECT is. Plain class: the amqtt plugin is a thin adapter over it."""

    def __init__(
        self,
        registry: DeviceRegistry,
        accounts: AccountRegistry,
        hasher: PasswordHasher,
        settings: Settings,
        *,
        answer_within: float | None = None,
    ) -> None:
        self._registry = registry
        self._accounts = accounts
        self._hasher = hasher
        self._settings = settings
        self._template = settings.acl.device_template
        #: How long a caller waits for an answer: a login that could not be checked sooner is
        #: refused at once rather than checked for nobody (the CONNECT timeout, or less).
        self._answer_within = min(settings.broker.connect_timeout, answer_within or math.inf)
        self.cache = VerifiedCache()
        auth = settings.auth
        self.throttle = LoginThrottle(
            ThrottlePolicy(
                throttle_after=auth.throttle_after,
                lockout_after=auth.lockout_after,
                window=auth.throttle_window,
                lockout_seconds=auth.lockout_seconds,
                max_delay=auth.max_refusal_delay,
            )
        )
        self.stats = AuthStats()
        self._dummy_hash = unmatchable_hash(hasher.cost)
        self._background: set[asyncio.Task[None]] = set()

    async def authenticate(self, attempt: ConnectAttempt) -> Decision:
        """Return the decision for one CONNECT."""
        username = attempt.username
        if username is not None and username.startswith(DEVICE_USERNAME_PREFIX):
            decision = await self._password_login(attempt, username, self._device_login)
        else:
            identity = identity_from_client_id(attempt.client_id)
            if identity is not None and username in (None, PROVISION_USERNAME):
                decision = self._provisioning_session(attempt, ProvisioningPrincipal(identity))
            elif username:
                decision = await self._password_login(attempt, username, self._account_login)
            else:
                decision = Decision(None, "no username, and the client id is not a MAC address")
        principal = decision.principal
        if principal is not None and attempt.will_flag and not _will_allowed(principal, attempt):
            # amqtt publishes a will without asking the topic plugins: without this check a
            # device could leave a "last word" in another device's namespace.
            decision = Decision(None, "will topic is not one the client may publish to")
        if not decision.accepted:
            self.stats.refusals[decision.reason] = self.stats.refusals.get(decision.reason, 0) + 1
        return decision

    async def _password_login(self, attempt: ConnectAttempt, username: str, check: _Check) -> Decision:
        if self.throttle.locked(username, attempt.address):
            return Decision(None, "locked out after repeated failures", NOT_AUTHORIZED)
        decision = await check(attempt, username)
        if decision.accepted:
            self.throttle.succeeded(username, attempt.address)
        elif decision.code == BAD_USERNAME_OR_PASSWORD:
            delay = self.throttle.failed(username, attempt.address)
            if delay > 0:
                await asyncio.sleep(delay)  # hold the refusal back; the loop keeps serving
        return decision

    async def _checked(self, username: str, tag: str, password: str, stored_hash: str) -> bool | None:
        """bcrypt (or the cache); None when the workers are too far behind to answer in time."""
        if self.cache.verified(username, tag, password):
            self.stats.cache_hits += 1
            return True
        if not await self._admit():
            return None
        self.stats.bcrypt_checks += 1
        if not await self._hasher.verify(password, stored_hash):
            return False
        self.cache.remember(username, tag, password)
        return True

    async def _admit(self) -> bool:
        # Bound the queue by waiting time: refuse only a login that could not be checked before
        # its client gives up (the CONNECT timeout), never one that merely has to wait its turn.
        if self._hasher.expected_wait() > self._answer_within:
            self.stats.overload_refusals += 1
            return False
        return True

    def _cached_login(self, attempt: ConnectAttempt, username: str) -> Decision | None:
        """A warm reconnect: the same (username, password) as an accepted login, no registry read."""
        principal = self.cache.principal(username, attempt.password or "")
        if principal is None:
            return None
        self.stats.cache_hits += 1
        client_id = attempt.client_id or ""
        if isinstance(principal, DevicePrincipal):
            if client_id != username:
                self._audit(principal.device_id, "client id differs from username")
                return Decision(None, "client id must equal the username")
            return Decision(principal, "device credentials (cached)")
        if not _account_client_id(username, client_id):
            return Decision(None, "client id must be the account name or NAME-<anything>")
        return Decision(principal, "service account (cached)")

    async def _device_login(self, attempt: ConnectAttempt, username: str) -> Decision:
        cached = self._cached_login(attempt, username)
        if cached is not None:
            return cached
        record = await self._registry.find_credentials_by_username(username)
        password = attempt.password or ""
        if record is None or record.password_hash is None:
            # Same bcrypt cost as a real check: timing must not tell which usernames exist.
            if not await self._admit():
                return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)
            await self._hasher.verify(password, await self._dummy())
            return Decision(None, "unknown username or no credentials", BAD_USERNAME_OR_PASSWORD)
        device = record.device
        tag = credential_tag(record.password_hash)
        verified = await self._checked(username, tag, password, record.password_hash)
        if verified is None:
            return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)
        if not verified:
            self._audit(device.id, "wrong password")
            return Decision(None, "wrong password", BAD_USERNAME_OR_PASSWORD)
        if device.status not in ACTIVE_STATUSES:
            return Decision(None, f"device is {device.status.value}")
        if attempt.client_id != username:
            self._audit(device.id, "client id differs from username")
            return Decision(None, "client id must equal the username")
        if device.activated_at is None:
            await self._registry.mark_activated(device.id)
        principal = self._device_principal(device, tag)
        self.cache.accept(username, tag, principal)
        return Decision(principal, "device credentials")

    def _device_principal(self, device: DeviceInfo, tag: str) -> DevicePrincipal:
        namespace = device_namespace(self._template, device)
        return DevicePrincipal(device.id, device.mqtt_username, device.mac, namespace, tag)

    async def _account_login(self, attempt: ConnectAttempt, username: str) -> Decision:
        cached = self._cached_login(attempt, username)
        if cached is not None:
            return cached
        record = await self._accounts.find(username)
        password = attempt.password or ""
        if record is None:
            if not await self._admit():
                return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)
            await self._hasher.verify(password, await self._dummy())
            return Decision(None, "unknown username", BAD_USERNAME_OR_PASSWORD)
        tag = credential_tag(record.password_hash)
        verified = await self._checked(username, tag, password, record.password_hash)
        if verified is None:
            return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)
        if not verified:
            return Decision(None, "wrong password", BAD_USERNAME_OR_PASSWORD)
        client_id = attempt.client_id or ""
        if not _account_client_id(username, client_id):
            return Decision(None, "client id must be the account name or NAME-<anything>")
        principal = _account_principal(record, tag)
        self.cache.accept(username, tag, principal)
        return Decision(principal, "service account")

    async def principal_for(self, username: str | None, client_id: str | None) -> Principal | None:
        """The principal of a session a broker has already authenticated, from the registry alone.

        For auth services whose broker asks about topics without the password (``mqttprov
        authd``): the same identity rules as :meth:`authenticate`, minus the password check,
        against the credential as it is *now* (None when it is no longer valid).
        """
        if username is not None and username.startswith(DEVICE_USERNAME_PREFIX):
            record = await self._registry.find_credentials_by_username(username)
            if (
                record is None
                or record.password_hash is None
                or record.device.status not in ACTIVE_STATUSES
                or client_id != username
            ):
                return None
            return self._device_principal(record.device, credential_tag(record.password_hash))
        identity = identity_from_client_id(client_id)
        if identity is not None and username in (None, "", PROVISION_USERNAME):
            return ProvisioningPrincipal(identity)
        if not username:
            return None
        account = await self._accounts.find(username)
        if account is None or not _account_client_id(username, client_id or ""):
            return None
        return _account_principal(account, credential_tag(account.password_hash))

    def _provisioning_session(self, attempt: ConnectAttempt, principal: ProvisioningPrincipal) -> Decision:
        if attempt.will_flag:
            return Decision(None, "provisioning sessions may not set a will")
        policy = self._settings.provisioning
        if policy.auth == "none":
            return Decision(principal, "provisioning session")
        if attempt.username != PROVISION_USERNAME:
            return Decision(None, f"provisioning needs username {PROVISION_USERNAME!r} and a proof")
        if policy.auth == "fleet_secret" and policy.fleet_secret is not None:
            expected = policy.fleet_secret.get_secret_value()
        elif policy.auth == "device_key" and policy.device_key_secret is not None:
            expected = derive_device_key(policy.device_key_secret.get_secret_value(), principal.identity.mac)
        else:  # pragma: no cover - the settings validator guarantees a secret
            return Decision(None, "provisioning proof is not configured")
        if not secrets_match(attempt.password, expected):
            return Decision(None, f"wrong {policy.auth}", BAD_USERNAME_OR_PASSWORD)
        return Decision(principal, f"provisioning session ({policy.auth})")

    async def settle(self, within: float = 5.0) -> None:
        """Wait (up to ``within`` seconds) for background writes still in flight.

        Called before the engine is disposed: a write cut off there would leave its database
        connection to the garbage collector, and its event unwritten.
        """
        if self._background:
            await asyncio.wait(set(self._background), timeout=within)

    def _audit(self, device_id: uuid.UUID, reason: str) -> None:
        """A folded ``login_refused`` event, written in the background (never delays the answer)."""
        task = asyncio.get_running_loop().create_task(
            self._registry.record_event(
                device_id, "login_refused", actor=Actor.DEVICE, detail={"reason": reason}, fold=True
            ),
            name=f"audit-login-{device_id}",
        )
        self._background.add(task)
        task.add_done_callback(self._audited)

    def _audited(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("could not record a login_refused event: %s", task.exception())

    async def _dummy(self) -> str:
        return self._dummy_hash


def unmatchable_hash(cost: int) -> str:
    """A well-formed bcrypt hash at ``cost`` that no password matches, made without hashing.

    Checking a password against it costs exactly one bcrypt run at ``cost``, as a real check
    does. Hashing a dummy password on first use instead made the first unknown-username login
    of a process cost two runs (a hash, then the check), and told that the name was unknown.
    """
    salt = bcrypt.gensalt(rounds=cost).decode("ascii")
    return salt + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(_BCRYPT_DIGEST_CHARS))
