"""The CONNECT decision: device login, service account, provisioning session, or refusal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from auth_plugin.acl import Action, allows
from auth_plugin.budget import BcryptBudget
from auth_plugin.cache import VerifiedCache
from auth_plugin.credentials import Credential, Kind, client_id_refusal, device_namespace
from auth_plugin.decisions import AuthStats, Check, ConnectAttempt, Decision, unchecked
from auth_plugin.password_check import LOGIN_DEADLINE, PasswordCheck, unmatchable_hash
from auth_plugin.principals import (
    BAD_USERNAME_OR_PASSWORD,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    DevicePrincipal,
    Principal,
    ProvisioningPrincipal,
)
from auth_plugin.throttle import LoginThrottle, ThrottlePolicy
from auth_plugin.verifiers import VerifierKey, load_verifier_key
from auth_plugin.writes import MAX_AUDITS_IN_FLIGHT, BackgroundWrites
from config import Settings
from provisioning.contract import DEVICE_USERNAME_PREFIX, PROVISION_USERNAME, identity_from_client_id
from provisioning.errors import RegistryUnavailableError
from provisioning.keys import derive_device_key, secrets_match
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.verifiers import VerifierStore

# Re-exported: callers import the decision types and these helpers from here.
__all__ = [
    "MAX_AUDITS_IN_FLIGHT",
    "AuthStats",
    "Authenticator",
    "Check",
    "ConnectAttempt",
    "Decision",
    "device_namespace",
    "unmatchable_hash",
]

logger = logging.getLogger(__name__)

#: Seconds a login decision may take at least, whatever the CONNECT timeout (a device waits longer).
MIN_LOGIN_DEADLINE = 5.0
#: Verified credentials loaded into the cache at start (most recently seen first).
WARM_UP_LIMIT = 50_000


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
        #: The deadline of each decision: the caller's own (authd's request_timeout) when it has
        #: one, else the CONNECT timeout but never under MIN_LOGIN_DEADLINE. The CONNECT timeout
        #: bounds how long a client may idle before it speaks; a loaded broker's own work on a
        #: login may take longer than a short one without anyone having given up.
        self._answer_within = (
            answer_within
            if answer_within is not None
            else max(settings.broker.connect_timeout, MIN_LOGIN_DEADLINE)
        )
        self.verifier_key: VerifierKey | None = load_verifier_key(settings)
        self.cache = VerifiedCache(verifier_key=self.verifier_key)
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
        self.budget = BcryptBudget(hasher, answer_within=self._answer_within)
        self._verifiers = VerifierStore(registry.engine)
        self._writes = BackgroundWrites(registry, self._verifiers, self.stats)
        self._background = self._writes.tasks  # the writes in flight (a test counts them)
        self._passwords = PasswordCheck(
            cache=self.cache,
            verifier_key=self.verifier_key,
            throttle=self.throttle,
            budget=self.budget,
            stats=self.stats,
            writes=self._writes,
            cost=hasher.cost,
        )
        # Decisions under way (each bounded by the deadline): settle() waits for them.
        self._deciding = 0
        self._none_deciding = asyncio.Event()
        self._none_deciding.set()

    async def authenticate(self, attempt: ConnectAttempt) -> Decision:
        """Return the decision for one CONNECT.

        Raises :class:`RegistryUnavailableError` when the registry cannot be read: that is no
        refusal of the credential, and each caller answers it retryably in its own protocol. A
        decision not reached before the caller gives up (a stalled database, a long bcrypt
        queue) is a retryable refusal (CONNACK 3), never an answer sent to nobody.
        """
        self._deciding += 1
        self._none_deciding.clear()
        deadline = LOGIN_DEADLINE.set(asyncio.get_running_loop().time() + self._answer_within)
        try:
            async with asyncio.timeout(self._answer_within):
                decision = await self._decide(attempt)
        except TimeoutError:
            decision = Decision(None, f"not decided within {self._answer_within:g}s", SERVER_UNAVAILABLE)
        finally:
            LOGIN_DEADLINE.reset(deadline)
            self._deciding -= 1
            if not self._deciding:
                self._none_deciding.set()
        stats = self.stats
        if decision.accepted:
            stats.accepted += 1
        else:
            stats.refusals[decision.reason] = stats.refusals.get(decision.reason, 0) + 1
            stats.refused_by_code[decision.code] = stats.refused_by_code.get(decision.code, 0) + 1
        return decision

    async def _decide(self, attempt: ConnectAttempt) -> Decision:
        username = attempt.username
        if username is not None and username.startswith(DEVICE_USERNAME_PREFIX):
            decision = await self._password_login(attempt, username, Kind.DEVICE)
        else:
            identity = identity_from_client_id(attempt.client_id)
            if identity is not None and username in (None, PROVISION_USERNAME):
                decision = await self._provisioning_session(attempt, ProvisioningPrincipal(identity))
            elif username:
                decision = await self._password_login(attempt, username, Kind.ACCOUNT)
            else:
                decision = Decision(None, "no username, and the client id is not a MAC address")
        principal = decision.principal
        if principal is not None and attempt.will_flag and not _will_allowed(principal, attempt):
            # amqtt publishes a will without asking the topic plugins: without this check a
            # device could leave a "last word" in another device's namespace.
            decision = Decision(None, "will topic is not one the client may publish to")
        return decision

    async def _password_login(self, attempt: ConnectAttempt, username: str, kind: Kind) -> Decision:
        if self.throttle.locked(username, attempt.address):
            return Decision(None, "locked out after repeated failures", NOT_AUTHORIZED)
        decision = await self._registered_login(attempt, username, kind)
        if decision.accepted:
            self.throttle.succeeded(username, attempt.address)
        elif decision.code == BAD_USERNAME_OR_PASSWORD:
            delay = self.throttle.failed(username, attempt.address)
            if delay > 0:
                await asyncio.sleep(delay)  # hold the refusal back; the loop keeps serving
        return decision

    async def _registered_login(self, attempt: ConnectAttempt, username: str, kind: Kind) -> Decision:
        """A login with a registered credential, a device's or an account's: the same steps."""
        cached = self.cache.principal(username, attempt.password or "")
        if cached is not None:  # a warm reconnect: an accepted (username, password), no registry read
            self.stats.cache_hits += 1
            device_id = cached.device_id if isinstance(cached, DevicePrincipal) else None
            cached_kind = Kind.ACCOUNT if device_id is None else Kind.DEVICE
            refused = self._client_id_refused(attempt, username, cached_kind, device_id)
            return refused or Decision(cached, f"{cached_kind.value} (cached)")
        since = self.cache.mark()  # a change dropped after this read keeps the login out of the cache
        credential = await self._find(kind, username)
        if credential is None:
            return await self._passwords.unknown(attempt, kind.unknown)
        device = credential.device
        check = await self._passwords.check(attempt, username, credential, since)
        if check is not Check.VERIFIED:
            if check is Check.WRONG and device is not None:
                self._writes.audit(device.id, "wrong password")
            return unchecked(check)
        reason = credential.refusal()
        if reason is not None:
            return Decision(None, reason)
        refused = self._client_id_refused(attempt, username, kind, None if device is None else device.id)
        if refused is not None:
            return refused
        if device is not None and device.activated_at is None:
            try:
                await self._registry.mark_activated(device.id)
            except RegistryUnavailableError as exc:  # a stamp: retried at the next login
                logger.warning("first login of %s not stamped: %s", username, exc)
        principal = credential.principal(self._template)
        self.cache.accept(username, credential.tag, principal)
        return Decision(principal, kind.value)

    def _client_id_refused(
        self, attempt: ConnectAttempt, username: str, kind: Kind, device_id: uuid.UUID | None
    ) -> Decision | None:
        """The refusal of a client id the credential may not use (a device's is audited)."""
        reason = client_id_refusal(kind, username, attempt.client_id)
        if reason is None:
            return None
        if device_id is not None:
            self._writes.audit(device_id, "client id differs from username")
        return Decision(None, reason)

    async def _find(self, kind: Kind, username: str) -> Credential | None:
        """The registered credential of ``username`` (None: unknown, or a device not provisioned)."""
        if kind is Kind.DEVICE:
            device = await self._registry.find_credentials_by_username(username)
            return None if device is None else Credential.of_device(device)
        account = await self._accounts.find(username)
        return None if account is None else Credential.of_account(account)

    async def principal_for(self, username: str | None, client_id: str | None) -> Principal | None:
        """The principal of a session a broker has already authenticated, from the registry alone.

        For auth services whose broker asks about topics without the password (``mqttprov
        authd``): the same identity rules as :meth:`authenticate`, minus the password check,
        against the credential as it is *now* (None when it is no longer valid).
        """
        if username is not None and username.startswith(DEVICE_USERNAME_PREFIX):
            return await self._current_principal(Kind.DEVICE, username, client_id)
        identity = identity_from_client_id(client_id)
        if identity is not None and username in (None, "", PROVISION_USERNAME):
            return ProvisioningPrincipal(identity)
        if not username:
            return None
        return await self._current_principal(Kind.ACCOUNT, username, client_id)

    async def _current_principal(self, kind: Kind, username: str, client_id: str | None) -> Principal | None:
        credential = await self._find(kind, username)
        if (
            credential is None
            or credential.refusal() is not None
            or client_id_refusal(kind, username, client_id) is not None
        ):
            return None
        return credential.principal(self._template)

    async def _provisioning_session(
        self, attempt: ConnectAttempt, principal: ProvisioningPrincipal
    ) -> Decision:
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
        # Guesses at the proof are throttled per address as wrong passwords are, and as the HTTP
        # path counts them (one key for both: PROVISION_USERNAME and the address); once locked,
        # the right proof from that address waits too. No succeeded(): one device's own key must
        # not wipe the count of another client's guesses from behind the same address.
        if self.throttle.locked(PROVISION_USERNAME, attempt.address):
            return Decision(None, "locked out after repeated wrong provisioning proofs", NOT_AUTHORIZED)
        if not secrets_match(attempt.password, expected):
            delay = self.throttle.failed(PROVISION_USERNAME, attempt.address)
            if delay > 0:
                await asyncio.sleep(delay)  # hold the refusal back; the loop keeps serving
            return Decision(None, f"wrong {policy.auth}", BAD_USERNAME_OR_PASSWORD)
        return Decision(principal, f"provisioning session ({policy.auth})")

    async def warm_up(self, limit: int = WARM_UP_LIMIT) -> int:
        """Load the stored verifiers of the most recently seen credentials into the cache.

        Called at start, after the change-feed follower has taken its position (a change made
        from then on drops what this loaded): the fleet that reconnects after a restart is then
        answered from memory, as before the restart, without a registry read per login. Returns
        how many were loaded; a registry that cannot be read loads none (one warning).
        """
        key = self.verifier_key
        if key is None or limit <= 0:
            return 0
        started = time.perf_counter()
        since = self.cache.mark()
        try:
            devices = await self._verifiers.verified_devices(key.key_id, limit)
            accounts = await self._verifiers.verified_accounts(key.key_id, limit)
        except RegistryUnavailableError as exc:
            logger.warning("verified credentials not loaded at start (logins read the registry): %s", exc)
            return 0
        credentials = [Credential.of_device(device) for device in devices]
        credentials += [Credential.of_account(account) for account in accounts]
        loaded = 0
        for credential in credentials:
            stored = None if credential is None else credential.own_verifier()
            if credential is not None and stored is not None:
                principal = credential.principal(self._template)
                loaded += self.cache.preload(
                    credential.username,
                    credential.stored_hash,
                    credential.tag,
                    stored.digest,
                    principal,
                    since=since,
                )
        logger.info(
            "%d verified credentials loaded in %.1fs: their logins need no registry read",
            loaded,
            time.perf_counter() - started,
        )
        return loaded

    async def settle(self, within: float = 5.0) -> None:
        """Wait (up to ``within`` seconds) for decisions and background writes still in flight.

        Called before the engine is disposed: a write cut off there would leave its database
        connection to the garbage collector, and its event unwritten; a decision cut off would
        leave its client's connection unanswered and open.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_deciding.wait(), within)
        await self._writes.settle(within)
