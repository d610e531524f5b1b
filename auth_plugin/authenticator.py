"""The CONNECT decision: device login, service account, provisioning session, or refusal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from contextvars import ContextVar

import bcrypt

from auth_plugin.acl import Action, allows
from auth_plugin.budget import BcryptBudget
from auth_plugin.cache import VerifiedCache
from auth_plugin.credentials import Credential, Kind, client_id_refusal, device_namespace
from auth_plugin.decisions import AuthStats, Check, ConnectAttempt, Decision, unchecked
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
from config import Settings
from provisioning.contract import DEVICE_USERNAME_PREFIX, PROVISION_USERNAME, identity_from_client_id
from provisioning.errors import RegistryUnavailableError
from provisioning.keys import derive_device_key, secrets_match
from provisioning.passwords import PasswordHasher
from provisioning.registry import Actor, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.verifiers import StoredVerifier, VerifierStore

# Re-exported: callers import the decision types and the namespace rule from here.
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

# bcrypt's own base-64 alphabet and the length of the digest after the 29-character salt.
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_DIGEST_CHARS = 31
#: When the decision under way must be made by (the event loop's clock), per task.
_DEADLINE: ContextVar[float | None] = ContextVar("mqttprov_login_deadline", default=None)
#: Seconds a login decision may take at least, whatever the CONNECT timeout (a device waits longer).
MIN_LOGIN_DEADLINE = 5.0
#: Verifiers made within this many seconds are written in one transaction.
VERIFIER_BATCH_SECONDS = 0.2
#: Verifiers waiting to be written at most (a registry that cannot take them: the oldest go).
MAX_UNSAVED_VERIFIERS = 10_000
#: Verified credentials loaded into the cache at start (most recently seen first).
WARM_UP_LIMIT = 50_000
#: Background registry writes (refusal audits) at once; more refusals are counted, not written.
MAX_AUDITS_IN_FLIGHT = 8
#: The budget's source for checks of usernames that are not registered: one share for all of them.
UNKNOWN_SOURCE = "unknown usernames"


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
        self._dummy_hash = unmatchable_hash(hasher.cost)
        self._dummy_verifier = StoredVerifier("", "", secrets.token_hex(32))
        self._foreign_key_warned = False
        self._verifier_write_failures = 0
        # Verifiers made and not yet written, by username (written in batches), and the writer.
        self._unsaved: dict[str, tuple[str, StoredVerifier]] = {}
        self._saving: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
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
        deadline = _DEADLINE.set(asyncio.get_running_loop().time() + self._answer_within)
        try:
            async with asyncio.timeout(self._answer_within):
                decision = await self._decide(attempt)
        except TimeoutError:
            decision = Decision(None, f"not decided within {self._answer_within:g}s", SERVER_UNAVAILABLE)
        finally:
            _DEADLINE.reset(deadline)
            self._deciding -= 1
            if not self._deciding:
                self._none_deciding.set()
        if not decision.accepted:
            self.stats.refusals[decision.reason] = self.stats.refusals.get(decision.reason, 0) + 1
        return decision

    async def _decide(self, attempt: ConnectAttempt) -> Decision:
        username = attempt.username
        if username is not None and username.startswith(DEVICE_USERNAME_PREFIX):
            decision = await self._password_login(attempt, username, Kind.DEVICE)
        else:
            identity = identity_from_client_id(attempt.client_id)
            if identity is not None and username in (None, PROVISION_USERNAME):
                decision = self._provisioning_session(attempt, ProvisioningPrincipal(identity))
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

    async def _checked(
        self, attempt: ConnectAttempt, username: str, credential: Credential, since: int
    ) -> Check:
        """Check the password against the credential: the cache, its verifier, else bcrypt."""
        stored_hash, tag = credential.stored_hash, credential.tag
        password = attempt.password or ""
        if self.cache.verified(username, tag, password):
            self.stats.cache_hits += 1
            return Check.VERIFIED
        key = self.verifier_key
        stored = credential.own_verifier()
        if key is not None and stored is not None:
            if stored.key_id == key.key_id:
                self.stats.verifier_checks += 1
                if not key.matches(stored, username, stored_hash, password):
                    return Check.WRONG
                self.cache.remember(username, tag, password, since=since)
                return Check.VERIFIED
            self._foreign_key_seen(username)
        if not self.throttle.begin_check(username, attempt.address):
            return Check.LOCKED
        try:
            verified = await self.budget.verify(
                attempt.address or f"username {username}", password, stored_hash, deadline=_DEADLINE.get()
            )
        finally:
            self.throttle.end_check(username, attempt.address)
        if verified is None:
            self.stats.overload_refusals += 1
            return Check.BUSY
        self.stats.bcrypt_checks += 1
        if not verified:
            return Check.WRONG
        self.cache.remember(username, tag, password, since=since)
        if key is not None:
            self._keep_verifier(username, stored_hash, key.make(username, stored_hash, tag, password))
        return Check.VERIFIED

    async def _unknown(self, attempt: ConnectAttempt, reason: str) -> Decision:
        """Refuse a username with no credential at the cost of checking one that has a verifier."""
        password = attempt.password or ""
        if self.verifier_key is not None:
            # The same work as a verifier check, so timing does not tell which usernames exist.
            self.verifier_key.matches(
                self._dummy_verifier, attempt.username or "", self._dummy_hash, password
            )
        elif (
            await self.budget.verify(UNKNOWN_SOURCE, password, self._dummy_hash, deadline=_DEADLINE.get())
            is None
        ):
            self.stats.overload_refusals += 1
            return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)
        return Decision(None, reason, BAD_USERNAME_OR_PASSWORD)

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
            return await self._unknown(attempt, kind.unknown)
        device = credential.device
        check = await self._checked(attempt, username, credential, since)
        if check is not Check.VERIFIED:
            if check is Check.WRONG and device is not None:
                self._audit(device.id, "wrong password")
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
            self._audit(device_id, "client id differs from username")
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
        if self._background:
            await asyncio.wait(set(self._background), timeout=within)

    def _audit(self, device_id: uuid.UUID, reason: str) -> None:
        """A folded ``login_refused`` event, written in the background (never delays the answer).

        At most :data:`MAX_AUDITS_IN_FLIGHT` at once: a flood of wrong passwords must not queue
        unbounded writes for the pool's connections (the logins' own reads need them). Refusals
        over the bound are only counted (``stats.audits_dropped``).
        """
        if len(self._background) >= MAX_AUDITS_IN_FLIGHT:
            self.stats.audits_dropped += 1
            return
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

    def _keep_verifier(self, username: str, stored_hash: str, verifier: StoredVerifier) -> None:
        """Store the verifier of a credential that has just passed bcrypt, in the background.

        Verifiers are written in batches (one transaction for all that arrived within
        :data:`VERIFIER_BATCH_SECONDS`): a cold storm of first logins must not be a storm of
        write transactions on the registry too.
        """
        self._unsaved[username] = (stored_hash, verifier)
        while len(self._unsaved) > MAX_UNSAVED_VERIFIERS:  # the oldest: bcrypt again, at worst
            del self._unsaved[next(iter(self._unsaved))]
        if self._saving is None or self._saving.done():
            self._saving = asyncio.get_running_loop().create_task(self._save_verifiers(), name="verifiers")
            self._background.add(self._saving)
            self._saving.add_done_callback(self._saved)

    def _saved(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if self._saving is task:
            self._saving = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("credential verifiers not stored: %s", task.exception())

    async def _save_verifiers(self) -> None:
        while self._unsaved:
            await asyncio.sleep(VERIFIER_BATCH_SECONDS)
            batch = [(username, *made) for username, made in self._unsaved.items()]
            self._unsaved.clear()
            try:
                await self._verifiers.save_many(batch)
            except RegistryUnavailableError as exc:
                # Their next logins are bcrypt checks again, and store them then: one line per outage.
                if not self._verifier_write_failures:
                    logger.warning("credential verifiers not stored, bcrypt until they are: %s", exc)
                self._verifier_write_failures += len(batch)
                continue
            if self._verifier_write_failures:
                logger.info(
                    "credential verifiers stored again (%d not stored)", self._verifier_write_failures
                )
                self._verifier_write_failures = 0

    def _foreign_key_seen(self, username: str) -> None:
        if not self._foreign_key_warned:
            self._foreign_key_warned = True
            logger.warning(
                "the verifier of %s was made under another key: every process on this registry must use "
                "the same [auth] verifier_key; checking with bcrypt and storing a verifier under this key",
                username,
            )


def unmatchable_hash(cost: int) -> str:
    """A well-formed bcrypt hash at ``cost`` that no password matches, made without hashing.

    Checking a password against it costs exactly one bcrypt run at ``cost``, as a real check
    does. Hashing a dummy password on first use instead made the first unknown-username login
    of a process cost two runs (a hash, then the check), and told that the name was unknown.
    """
    salt = bcrypt.gensalt(rounds=cost).decode("ascii")
    return salt + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(_BCRYPT_DIGEST_CHARS))
