"""The CONNECT decision: device login, provisioning session, or refusal."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from auth_plugin.principals import (
    BAD_USERNAME_OR_PASSWORD,
    NOT_AUTHORIZED,
    DevicePrincipal,
    Principal,
    ProvisioningPrincipal,
)
from config import Settings
from provisioning.contract import PROVISION_USERNAME, identity_from_client_id
from provisioning.keys import derive_device_key, secrets_match
from provisioning.passwords import PasswordHasher
from provisioning.registry import ACTIVE_STATUSES, DeviceRegistry

logger = logging.getLogger(__name__)

DEVICE_USERNAME_PREFIX = "device_"


@dataclass(frozen=True)
class ConnectAttempt:
    """What a CONNECT presented."""

    client_id: str | None
    username: str | None
    password: str | None
    will_flag: bool = False
    address: str | None = None


@dataclass(frozen=True)
class Decision:
    """The principal to bind on success, or why not (for the log; never sent to the client)."""

    principal: Principal | None
    reason: str
    #: CONNACK code for a refusal: 4 for wrong credentials, 5 for everything else.
    code: int = NOT_AUTHORIZED

    @property
    def accepted(self) -> bool:
        """True when the CONNECT may proceed."""
        return self.principal is not None


class Authenticator:
    """Decide who a CONNECT is. Plain class: the amqtt plugin is a thin adapter over it."""

    def __init__(self, registry: DeviceRegistry, hasher: PasswordHasher, settings: Settings) -> None:
        self._registry = registry
        self._hasher = hasher
        self._settings = settings
        self._dummy_hash: str | None = None

    async def authenticate(self, attempt: ConnectAttempt) -> Decision:
        """Return the decision for one CONNECT."""
        username = attempt.username
        if username is not None and username.startswith(DEVICE_USERNAME_PREFIX):
            return await self._device_login(attempt, username)
        identity = identity_from_client_id(attempt.client_id)
        if identity is not None:
            return self._provisioning_session(attempt, ProvisioningPrincipal(identity))
        return Decision(None, "not a device login and the client id is not a MAC address")

    async def _device_login(self, attempt: ConnectAttempt, username: str) -> Decision:
        record = await self._registry.find_credentials_by_username(username)
        password = attempt.password or ""
        if record is None or record.password_hash is None:
            # Same bcrypt cost as a real check: timing must not tell which usernames exist.
            await self._hasher.verify(password, await self._dummy())
            return Decision(None, "unknown username or no credentials", BAD_USERNAME_OR_PASSWORD)
        if not await self._hasher.verify(password, record.password_hash):
            return Decision(None, "wrong password", BAD_USERNAME_OR_PASSWORD)
        device = record.device
        if device.status not in ACTIVE_STATUSES:
            return Decision(None, f"device is {device.status.value}")
        if attempt.client_id != username:
            return Decision(None, "client id must equal the username")
        if device.activated_at is None:
            await self._registry.mark_activated(device.id)
        return Decision(
            DevicePrincipal(device.id, username, device.mac, f"devices/{device.id}/"),
            "device credentials",
        )

    def _provisioning_session(self, attempt: ConnectAttempt, principal: ProvisioningPrincipal) -> Decision:
        if attempt.will_flag:
            return Decision(None, "provisioning sessions may not set a will")
        policy = self._settings.provisioning
        if policy.auth == "none":
            if attempt.username not in (None, PROVISION_USERNAME):
                return Decision(None, "unexpected username for a provisioning session")
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

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self._hasher.hash("mqttprov-dummy-password")
        return self._dummy_hash
