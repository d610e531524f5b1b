"""Registered password credentials, a device's or a service account's: each kind's rules, once."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from auth_plugin.principals import AccountPrincipal, DevicePrincipal, credential_tag
from provisioning.registry import ACTIVE_STATUSES, DeviceCredentials, DeviceInfo
from provisioning.registry.accounts import AccountCredentials, AccountInfo, account_client_id_allowed
from provisioning.registry.verifiers import StoredVerifier
from provisioning.topics import validate_filter

__all__ = ["Credential", "Kind", "client_id_refusal", "device_namespace"]


class Kind(enum.Enum):
    """Whose password a login presents; the value is the reason an accepted login is logged with."""

    DEVICE = "device credentials"
    ACCOUNT = "service account"

    @property
    def unknown(self) -> str:
        """The reason a username of this kind with no credential is refused with."""
        return "unknown username or no credentials" if self is Kind.DEVICE else "unknown username"


def device_namespace(template: str, device: DeviceInfo) -> str:
    """The device's one topic filter: ``[acl] device_template`` with its own values filled in."""
    # Ids, usernames and canonical MACs contain no '+', '#' or '/', so nothing can be injected.
    return validate_filter(
        template.format(device_id=device.id, username=device.mqtt_username, mac=device.mac)
    )


def client_id_refusal(kind: Kind, username: str, client_id: str | None) -> str | None:
    """Why ``client_id`` may not log in as ``username`` (None: it may)."""
    if kind is Kind.DEVICE:
        return None if client_id == username else "client id must equal the username"
    if account_client_id_allowed(username, client_id or ""):
        return None
    return "client id must be the account name or NAME-<anything>"


@dataclass(frozen=True)
class Credential:
    """A registered credential as a login checks it: its hash, its verifier, and whose it is."""

    kind: Kind
    username: str
    stored_hash: str
    verifier: StoredVerifier | None
    #: The device it logs in (a device credential), or the account (an account credential).
    device: DeviceInfo | None = None
    account: AccountInfo | None = None

    @classmethod
    def of_device(cls, record: DeviceCredentials) -> Credential | None:
        """The device's credential; None when it has none (not provisioned yet)."""
        if record.password_hash is None:
            return None
        device = record.device
        return cls(Kind.DEVICE, device.mqtt_username, record.password_hash, record.verifier, device=device)

    @classmethod
    def of_account(cls, record: AccountCredentials) -> Credential:
        """The service account's credential."""
        account = record.account
        return cls(Kind.ACCOUNT, account.name, record.password_hash, record.verifier, account=account)

    @property
    def tag(self) -> str:
        """The credential's fingerprint (see :func:`credential_tag`)."""
        return credential_tag(self.stored_hash)

    def own_verifier(self) -> StoredVerifier | None:
        """The stored verifier if it was made for this very hash (one made for an earlier
        credential is never trusted)."""
        verifier = self.verifier
        return verifier if verifier is not None and verifier.tag == self.tag else None

    def refusal(self) -> str | None:
        """Why the right password still may not log in (a device no longer active), else None."""
        if self.device is not None and self.device.status not in ACTIVE_STATUSES:
            return f"device is {self.device.status.value}"
        return None

    def principal(self, template: str) -> DevicePrincipal | AccountPrincipal:
        """Who a login with this credential is (``template``: ``[acl] device_template``)."""
        if self.device is not None:
            device = self.device
            namespace = device_namespace(template, device)
            return DevicePrincipal(device.id, device.mqtt_username, device.mac, namespace, self.tag)
        assert self.account is not None  # one of the two, by construction
        rules = self.account.allow
        return AccountPrincipal(
            name=self.account.name,
            subscribe=tuple(r.filter for r in rules if r.action == "subscribe"),
            publish=tuple(r.filter for r in rules if r.action == "publish"),
            tag=self.tag,
        )
