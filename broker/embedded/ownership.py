"""Whose a session is: resumed only by the principal that created it, never by a look-alike.

A persistent session (clean session 0) holds subscriptions granted and messages queued under its
principal's rules. amqtt resumes it for whoever next connects with its client id; here only the
same principal with the same credential does (:func:`owner`), so a re-created account, a device
provisioned again or another kind of login starts afresh. An account's client ids (``NAME`` and
``NAME-<anything>``) must never read as a MAC (:func:`account_client_id_allowed`, kept with the
accounts in :mod:`provisioning.registry.accounts`), or an account
named ``ab`` would share ``ab-cd-ef-01-23-45`` with that MAC's provisioning session.
"""

from __future__ import annotations

import uuid

from auth_plugin.principals import AccountPrincipal, DevicePrincipal, Principal, ProvisioningPrincipal
from provisioning.registry.accounts import account_client_id_allowed

__all__ = ["Owner", "account_client_id_allowed", "owner"]

Owner = tuple[str, str | uuid.UUID, str]


def owner(principal: Principal | None) -> Owner | None:
    """The principal a session belongs to, with its credential: (kind, identity, credential tag)."""
    if isinstance(principal, DevicePrincipal):
        return "device", principal.device_id, principal.tag
    if isinstance(principal, AccountPrincipal):
        return "account", principal.name, principal.tag
    if isinstance(principal, ProvisioningPrincipal):
        return "provisioning", principal.identity.mac, ""
    return None
