"""The provisioning decision: who gets credentials, who waits, who is refused.

Plain class, driven by the amqtt plugin in :mod:`broker.embedded.plugins.provisioning`, by the
worker on an external broker and directly by tests. The reply is produced only after the database
commit that makes the credentials valid.

A request that cannot be decided now (the registry is unavailable, or no decision within
:data:`REQUEST_DEADLINE`) is answered ``UNAVAILABLE`` with ``retry_after``: never dropped, never
a refusal that would make firmware give up. Once a credential is committed the reply is ``ok``
whatever the time; a commit cut off by the deadline may still land on the server, leaving a
password nobody received, which the device's next request replaces (a reissue, as when a broker
dies between the commit and the reply).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config import BrokerSettings, Settings
from provisioning.contract import (
    ClientIdentity,
    ErrorCode,
    ErrorReply,
    OkReply,
    PendingReply,
    ProvisionRequest,
    Reply,
    RequestRefusedError,
    decode_request,
    event_topic,
    reply_topic,
)
from provisioning.credential_pool import CredentialPool
from provisioning.errors import (
    ConcurrentChangeError,
    DeviceExistsError,
    InvalidMacError,
    RegistryUnavailableError,
)
from provisioning.mac import parse_device_mac
from provisioning.passwords import PasswordHasher, generate_password
from provisioning.ratelimit import RateLimiter
from provisioning.registry import Actor, DeviceCredentials, DeviceInfo, DeviceRegistry, DeviceStatus
from provisioning.registry.models import utcnow
from provisioning.registry.outage import OutageLog

if TYPE_CHECKING:
    from provisioning.ports import CredentialSink, SessionControl

logger = logging.getLogger(__name__)

_ACTIVE = {DeviceStatus.REGISTERED, DeviceStatus.ONLINE, DeviceStatus.OFFLINE}
# Refusals about a known device worth an audit row (folded); floods of unknown MACs are only logged.
_AUDITED = {ErrorCode.NOT_ALLOWED, ErrorCode.ALREADY_PROVISIONED, ErrorCode.DECOMMISSIONED}

#: Seconds from a request's arrival to its reply: under the 10 s a device waits for it (the
#: README's firmware sketch, :mod:`provisioning.client`), so the answer still finds the device.
REQUEST_DEADLINE = 8.0
#: ``retry_after`` of an ``UNAVAILABLE`` reply (at least ``reissue_cooldown``), plus up to
#: :data:`UNAVAILABLE_SPREAD` seconds more drawn per reply: a fleet turned away by one outage
#: must not come back in one wave.
UNAVAILABLE_RETRY_AFTER = 10
UNAVAILABLE_SPREAD = 10
# What an outage stops, as the first line of its story says (see OutageLog).
_AFFECTED = "provisioning: requests answered UNAVAILABLE, devices ask again"


@dataclass(frozen=True)
class Outcome:
    """What to publish, where, and which device changed (for the events topic)."""

    topic: str
    reply: Reply
    changed: DeviceInfo | None = None

    def event(self) -> tuple[str, bytes] | None:
        """The enrolment event for back ends (topic, JSON; never a secret), if a device changed."""
        device = self.changed
        if device is None:
            return None
        event = {
            "device_id": str(device.id),
            "mac": device.mac,
            "status": device.status.value,
            "time": device.updated_at.isoformat(),
        }
        return event_topic(device.id), json.dumps(event).encode()


class ProvisioningService:
    """Turn one ``provision/request`` into exactly one reply."""

    def __init__(
        self,
        registry: DeviceRegistry,
        hasher: PasswordHasher,
        settings: Settings,
        *,
        sessions: SessionControl | None = None,
        credentials: CredentialSink | None = None,
        pool: CredentialPool | None = None,
        outage: OutageLog | None = None,
        deadline: float = REQUEST_DEADLINE,
    ) -> None:
        self._registry = registry
        self._hasher = hasher
        self._settings = settings
        self._policy = settings.provisioning
        self._sessions = sessions
        self._credentials = credentials
        self._by_mac = RateLimiter(self._policy.mac_requests_per_minute, self._policy.mac_burst)
        self._by_address = RateLimiter(self._policy.address_requests_per_minute, self._policy.address_burst)
        self._slots = asyncio.Semaphore(self._policy.max_concurrent)
        #: Ready-made credentials; whoever runs this service runs ``pool.run()`` beside it.
        self.pool = pool if pool is not None else CredentialPool(hasher, self._policy.credential_pool_size)
        #: The database's outage story (shared with the process's other loops, if given).
        self.outage = outage or OutageLog(logger)
        #: Requests that missed their deadline: a stalled database, or bcrypt far behind.
        self.late = OutageLog(logger, subject="provisioning")
        self.deadline = deadline
        #: Replies by result: ``ok``, ``pending``, or the refusal's ``error_code``.
        self.results: Counter[str] = Counter()

    def bind_sessions(self, sessions: SessionControl) -> None:
        """Late binding: the broker exists only after the plugins that use this service."""
        self._sessions = sessions

    def advertise(self, broker: BrokerSettings) -> None:
        """Late binding too: tell devices where the broker listens once a port-0 listener has bound."""
        self._settings = self._settings.model_copy(update={"broker": broker})

    async def handle(self, identity: ClientIdentity, payload: bytes, address: str | None) -> Outcome:
        """Decide, commit, and return the reply for one request, within :attr:`deadline`
        seconds once it is worked on. Never raises."""
        outcome = await self._handle(identity, payload, address)
        reply = outcome.reply
        self.results[reply.error_code.value if isinstance(reply, ErrorReply) else reply.status] += 1
        return outcome

    async def _handle(self, identity: ClientIdentity, payload: bytes, address: str | None) -> Outcome:
        # The session's own topic until the request names its MAC as the device wrote it.
        topic = reply_topic(identity.written)
        request_id: str | None = None
        try:
            request, mac = self._parse(identity, payload)
            request_id = request.request_id
            topic = reply_topic(request.mac)
            limited = self._rate_limited(mac, address, request_id)
            if limited is not None:
                return Outcome(topic, limited)
            if self._slots.locked():
                return Outcome(topic, _refusal(ErrorCode.RATE_LIMITED, "broker busy", request_id, 1))
            async with self._slots:
                return await self._decide_in_time(mac, request, topic)
        except RequestRefusedError as exc:
            logger.info("provisioning refused client=%r code=%s", identity.written, exc.code.value)
            return Outcome(topic, _refusal(exc.code, exc.detail, exc.request_id or request_id))
        except RegistryUnavailableError as exc:
            # Routine while the database is away: one story per outage, no traceback.
            self.outage.failed(_AFFECTED, exc)
            return Outcome(topic, self._unavailable("the registry is unavailable", request_id))
        except Exception:
            logger.exception("provisioning failed for client %r", identity.written)
            return Outcome(topic, _refusal(ErrorCode.INTERNAL, "internal error; try again later", request_id))

    async def _decide_in_time(self, mac: str, request: ProvisionRequest, topic: str) -> Outcome:
        deadline = asyncio.timeout(self.deadline)
        try:
            async with deadline:
                outcome = await self._decide(mac, request, topic, deadline)
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours: a bug somewhere below
            self.late.failed(
                f"requests not decided within {self.deadline:g} s: answered UNAVAILABLE",
                TimeoutError(f"no decision within {self.deadline:g} s"),
            )
            return Outcome(topic, self._unavailable("not decided in time", request.request_id))
        self.outage.succeeded()  # every decision reads the registry
        self.late.succeeded()
        return outcome

    def _unavailable(self, why: str, request_id: str | None) -> ErrorReply:
        # Never sooner than the reissue cool-down: a commit cut off by the deadline may still
        # have landed, and the device's next request must be able to replace it.
        floor = max(UNAVAILABLE_RETRY_AFTER, math.ceil(self._policy.reissue_cooldown))
        wait = floor + secrets.randbelow(UNAVAILABLE_SPREAD + 1)
        detail = f"{why}; nothing was issued, ask again after retry_after seconds"
        return _refusal(ErrorCode.UNAVAILABLE, detail, request_id, wait)

    def _parse(self, identity: ClientIdentity, payload: bytes) -> tuple[ProvisionRequest, str]:
        request = decode_request(payload, max_bytes=self._policy.max_payload_bytes)
        try:
            mac = parse_device_mac(request.mac)
        except InvalidMacError as exc:
            raise RequestRefusedError(ErrorCode.INVALID_MAC, str(exc), request.request_id) from exc
        if mac != identity.mac:
            raise RequestRefusedError(
                ErrorCode.MAC_MISMATCH,
                f"request names {mac} but this session's client id is {identity.mac}",
                request.request_id,
            )
        return request, mac

    def _rate_limited(self, mac: str, address: str | None, request_id: str | None) -> ErrorReply | None:
        wait = self._by_address.acquire(address) if address else 0.0
        if not wait:
            wait = self._by_mac.acquire(mac)
        if not wait:
            return None
        logger.debug("provisioning rate-limited mac=%s address=%s", mac, address)
        return _refusal(
            ErrorCode.RATE_LIMITED, "too many requests", request_id, RateLimiter.whole_seconds(wait)
        )

    async def _decide(
        self,
        mac: str,
        request: ProvisionRequest,
        topic: str,
        deadline: asyncio.Timeout,
        *,
        retried: bool = False,
    ) -> Outcome:
        record = await self._registry.find_credentials_by_mac(mac)
        if record is None:
            if self._policy.mode == "allowlist":
                return self._refuse(
                    topic, ErrorCode.NOT_ALLOWED, "this MAC is not on the allowlist", request, mac
                )
            try:
                if self._policy.mode == "approval":
                    created = await self._registry.create_device(
                        mac,
                        status=DeviceStatus.PENDING,
                        firmware_version=request.firmware_version,
                        sensor_types=request.sensor_types,
                        actor=Actor.DEVICE,
                        event_kind="requested",
                    )
                    logger.info("device waiting for approval id=%s mac=%s", created.id, mac)
                    return Outcome(topic, self._pending(request), created)
                return await self._enrol_new(mac, request, topic, deadline)
            except DeviceExistsError:
                if retried:
                    raise
                # Another session or broker created it first: decide again on what is there now.
                return await self._decide(mac, request, topic, deadline, retried=True)
        return await self._decide_known(record, request, topic, deadline)

    async def _decide_known(
        self, record: DeviceCredentials, request: ProvisionRequest, topic: str, deadline: asyncio.Timeout
    ) -> Outcome:
        device = record.device
        match device.status:
            case DeviceStatus.PENDING:
                return Outcome(topic, self._pending(request))
            case DeviceStatus.REJECTED:
                return self._refuse(
                    topic, ErrorCode.NOT_ALLOWED, "an operator rejected this device", request, device
                )
            case DeviceStatus.DECOMMISSIONED:
                return self._refuse(
                    topic, ErrorCode.DECOMMISSIONED, "this device is decommissioned", request, device
                )
            case DeviceStatus.APPROVED:
                return await self._issue(record, request, topic, "provisioned", deadline)
        if record.password_hash is None:  # reset by an operator: one new enrolment
            return await self._issue(record, request, topic, "provisioned", deadline)
        if device.activated_at is not None and self._policy.reprovision == "reject":
            return self._refuse(
                topic,
                ErrorCode.ALREADY_PROVISIONED,
                "this device has credentials and has used them",
                request,
                device,
            )
        wait = self._cooldown_left(device)
        if wait > 0:
            return Outcome(
                topic,
                _refusal(ErrorCode.RATE_LIMITED, "credentials were just issued", request.request_id, wait),
            )
        return await self._issue(record, request, topic, "reissued", deadline)

    def _cooldown_left(self, device: DeviceInfo) -> int:
        if device.credentials_issued_at is None:
            return 0
        elapsed = (utcnow() - device.credentials_issued_at).total_seconds()
        left = self._policy.reissue_cooldown - elapsed
        return max(1, math.ceil(left)) if left > 0 else 0

    async def _enrol_new(
        self, mac: str, request: ProvisionRequest, topic: str, deadline: asyncio.Timeout
    ) -> Outcome:
        password, password_hash = await self._new_credentials()
        device = await self._registry.create_device(
            mac,
            status=DeviceStatus.REGISTERED,
            firmware_version=request.firmware_version,
            sensor_types=request.sensor_types,
            password_hash=password_hash,
            actor=Actor.DEVICE,
            event_kind="provisioned",
        )
        await self._hand_over(device, password, password_hash)
        _committed(deadline)
        logger.info("device provisioned id=%s mac=%s", device.id, mac)
        return Outcome(topic, self._ok(device, password, request), device)

    async def _issue(
        self,
        record: DeviceCredentials,
        request: ProvisionRequest,
        topic: str,
        kind: str,
        deadline: asyncio.Timeout,
    ) -> Outcome:
        device = record.device
        password, password_hash = await self._new_credentials()
        try:
            updated = await self._registry.issue_credentials(
                device.id,
                password_hash,
                expected_hash=record.password_hash,
                allowed_from={device.status},
                firmware_version=request.firmware_version,
                sensor_types=request.sensor_types or None,
                kind=kind,
            )
        except ConcurrentChangeError:
            wait = max(1, math.ceil(self._policy.reissue_cooldown))
            return Outcome(
                topic,
                _refusal(ErrorCode.RATE_LIMITED, "device changed concurrently", request.request_id, wait),
            )
        await self._hand_over(updated, password, password_hash)
        _committed(deadline)
        logger.info("device %s id=%s mac=%s", kind, updated.id, updated.mac)
        if device.status in _ACTIVE and self._sessions is not None:
            # The old credentials are dead: end a session still using them (no will).
            await self._sessions.kick(device.mqtt_username, f"credentials {kind}")
        return Outcome(topic, self._ok(updated, password, request), updated)

    async def _new_credentials(self) -> tuple[str, str]:
        """A password and its hash: a pooled pair if one is ready (used once), else hashed now."""
        pooled = self.pool.take()
        if pooled is not None:
            return pooled.password, pooled.password_hash
        password = generate_password()
        return password, await self._hasher.hash(password)

    async def _hand_over(self, device: DeviceInfo, password: str, password_hash: str) -> None:
        # After the commit, before the reply: an external broker that hashes passwords itself
        # learns this one now or never. If it fails, the device gets INTERNAL and asks again.
        if self._credentials is not None:
            await self._credentials.issued(device, password, password_hash)

    def _ok(self, device: DeviceInfo, password: str, request: ProvisionRequest) -> OkReply:
        broker = self._settings.broker
        return OkReply(
            device_id=device.id,
            mqtt_username=device.mqtt_username,
            mqtt_password=password,
            mqtt_client_id=device.mqtt_username,
            mqtt_host=broker.effective_advertised_host,
            mqtt_port=broker.effective_advertised_port,
            topic_prefix=self._topic_prefix(device),
            request_id=request.request_id,
        )

    def _topic_prefix(self, device: DeviceInfo) -> str:
        # The filter the ACL gives this device ([acl] device_template) without its trailing '#'.
        namespace = self._settings.acl.device_template.format(
            device_id=device.id, username=device.mqtt_username, mac=device.mac
        )
        return namespace.removesuffix("#")

    def _pending(self, request: ProvisionRequest) -> PendingReply:
        return PendingReply(retry_after=self._policy.pending_retry_after, request_id=request.request_id)

    def _refuse(
        self,
        topic: str,
        code: ErrorCode,
        detail: str,
        request: ProvisionRequest,
        about: DeviceInfo | str,
    ) -> Outcome:
        mac = about if isinstance(about, str) else about.mac
        logger.info("provisioning refused mac=%s code=%s", mac, code.value)
        if code in _AUDITED and isinstance(about, DeviceInfo):
            self._audit(about, code)
        return Outcome(topic, _refusal(code, detail, request.request_id))

    def _audit(self, device: DeviceInfo, code: ErrorCode) -> None:
        task = asyncio.get_running_loop().create_task(
            self._registry.record_event(
                device.id, "provision_refused", actor=Actor.DEVICE, detail={"code": code.value}, fold=True
            ),
            name=f"audit-{device.id}",
        )
        _background.add(task)
        task.add_done_callback(_finished)


# Audit writes are best effort and must not delay the reply; keep a reference until done.
_background: set[asyncio.Task[None]] = set()


def _finished(task: asyncio.Task[None]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("could not record an audit event: %s", task.exception())


def _committed(deadline: asyncio.Timeout) -> None:
    # The new password is the stored one (and the external broker's): its ok reply is the only
    # one this request may get now, whatever the time. Before this point the deadline answers
    # UNAVAILABLE, and a password stored meanwhile is replaced by the device's next request.
    deadline.reschedule(None)


def _refusal(
    code: ErrorCode, detail: str, request_id: str | None, retry_after: int | None = None
) -> ErrorReply:
    return ErrorReply(error_code=code, detail=detail, request_id=request_id, retry_after=retry_after)
