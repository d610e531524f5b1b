"""Who a session is, decided once at CONNECT and kept on the amqtt session."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from provisioning.contract import ClientIdentity

#: Keys in ``amqtt.session.Session.attributes`` (namespaced, as amqtt asks).
PRINCIPAL_KEY = "mqttprov.principal"
REFUSAL_KEY = "mqttprov.refusal_code"

#: CONNACK return codes we answer refusals with (MQTT 3.1.1 §3.2.2.3).
SERVER_UNAVAILABLE = 0x03
BAD_USERNAME_OR_PASSWORD = 0x04
NOT_AUTHORIZED = 0x05


def credential_tag(password_hash: str) -> str:
    """A short fingerprint of a stored hash: it changes whenever the credential does."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ProvisioningPrincipal:
    """An anonymous (or fleet-proved) device asking for credentials for its own MAC."""

    identity: ClientIdentity


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    """A provisioned device logged in with its own credentials."""

    device_id: uuid.UUID
    username: str
    mac: str
    #: The one filter the device may use (``[acl] device_template`` filled in at login).
    namespace: str
    tag: str


@dataclass(frozen=True, slots=True)
class AccountPrincipal:
    """A service account: exactly the rules an operator gave it."""

    name: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    tag: str


Principal = ProvisioningPrincipal | DevicePrincipal | AccountPrincipal
_PRINCIPAL_TYPES = (ProvisioningPrincipal, DevicePrincipal, AccountPrincipal)


def principal_of(session: Any) -> Principal | None:
    """The principal bound to an amqtt session at CONNECT, if any."""
    attributes = getattr(session, "attributes", None)
    if not isinstance(attributes, dict):
        return None
    found = attributes.get(PRINCIPAL_KEY)
    return found if isinstance(found, _PRINCIPAL_TYPES) else None


def bind_principal(session: Any, principal: Principal | None) -> None:
    """Attach (or clear) the session's principal."""
    attributes = getattr(session, "attributes", None)
    if isinstance(attributes, dict):
        if principal is None:
            attributes.pop(PRINCIPAL_KEY, None)
        else:
            attributes[PRINCIPAL_KEY] = principal


def set_refusal_code(session: Any, code: int) -> None:
    """Remember which CONNACK code a refused CONNECT gets."""
    attributes = getattr(session, "attributes", None)
    if isinstance(attributes, dict):
        attributes[REFUSAL_KEY] = code


def refusal_code(session: Any) -> int:
    """The CONNACK code for a refused session (not authorized unless the plugin said otherwise)."""
    attributes = getattr(session, "attributes", None)
    code = attributes.get(REFUSAL_KEY) if isinstance(attributes, dict) else None
    allowed = (SERVER_UNAVAILABLE, BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED)
    return code if code in allowed else NOT_AUTHORIZED
