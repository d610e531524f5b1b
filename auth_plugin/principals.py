"""Who a session is, decided once at CONNECT and kept on the amqtt session."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from provisioning.contract import ClientIdentity

#: Key in ``amqtt.session.Session.attributes`` (namespaced, as amqtt asks).
PRINCIPAL_KEY = "mqttprov.principal"


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
    #: Topic prefix the device owns, e.g. ``devices/<id>/`` (compiled at login).
    namespace: str


Principal = ProvisioningPrincipal | DevicePrincipal


def principal_of(session: Any) -> Principal | None:
    """The principal bound to an amqtt session at CONNECT, if any."""
    attributes = getattr(session, "attributes", None)
    if not isinstance(attributes, dict):
        return None
    found = attributes.get(PRINCIPAL_KEY)
    return found if isinstance(found, ProvisioningPrincipal | DevicePrincipal) else None


def bind_principal(session: Any, principal: Principal | None) -> None:
    """Attach (or clear) the session's principal."""
    attributes = getattr(session, "attributes", None)
    if isinstance(attributes, dict):
        if principal is None:
            attributes.pop(PRINCIPAL_KEY, None)
        else:
            attributes[PRINCIPAL_KEY] = principal
