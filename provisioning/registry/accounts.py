"""Service accounts: back ends that log in with a name, a password and explicit topic rules."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from provisioning.contract import DEVICE_USERNAME_PREFIX, PROVISION_USERNAME, identity_from_client_id
from provisioning.errors import ProvisioningError
from provisioning.mac import is_mac
from provisioning.registry.models import CredentialVerifier, ServiceAccount, utcnow
from provisioning.registry.schemas import StoredVerifier, aware
from provisioning.registry.transactions import Repository, record_change
from provisioning.topics import TopicRule

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_.])?")
_RESERVED_PREFIXES = (DEVICE_USERNAME_PREFIX, PROVISION_USERNAME)


class AccountError(ProvisioningError):
    """A service account operation was refused (an invalid name, for one)."""

    error_code = "INVALID_ACCOUNT"


class AccountNotFoundError(AccountError, LookupError):
    """No service account has this name."""

    error_code = "NOT_FOUND"


class AccountExistsError(AccountError):
    """A service account with this name already exists."""

    error_code = "ALREADY_EXISTS"


class AccountInfo(BaseModel):
    """A service account as operators see it (never the hash)."""

    model_config = ConfigDict(frozen=True)

    name: str
    allow: list[TopicRule]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: ServiceAccount) -> AccountInfo:
        """Build the view from an ORM row."""
        return cls(
            name=row.name,
            allow=[TopicRule.model_validate(r) for r in row.rules],
            created_at=aware(row.created_at) or utcnow(),
            updated_at=aware(row.updated_at) or utcnow(),
        )


class AccountCredentials(BaseModel):
    """An account with its hash, for the auth service only."""

    model_config = ConfigDict(frozen=True)

    account: AccountInfo
    password_hash: str = Field(repr=False)
    #: The stored verifier of this credential, if one was made (``credential_verifiers``).
    verifier: StoredVerifier | None = Field(default=None, repr=False)

    @classmethod
    def from_rows(cls, row: ServiceAccount, verifier: CredentialVerifier | None) -> AccountCredentials:
        """The view of an account row (and the row of its verifier, if read with it)."""
        return cls(
            account=AccountInfo.from_row(row),
            password_hash=row.password_hash,
            verifier=StoredVerifier.from_row(verifier),
        )


def validate_account_name(name: str) -> str:
    """A name usable as MQTT username and client id prefix, distinct from devices and MACs.

    The account connects as NAME or NAME-<anything>: neither may read as a MAC in any notation,
    with or without a suffix. Besides a MAC itself (``aabb.ccdd.eeff``, ``aabbccddeeff``), that
    rules out the first groups of a MAC in dash notation (``ab``, ``ab-cd``, ... ``ab-cd-ef-01-23``),
    which a suffix would complete.
    """
    if (
        not _NAME.fullmatch(name)
        or name.lower().startswith(_RESERVED_PREFIXES)
        or is_mac(name)
        or any(is_mac(name + "-00" * missing) for missing in range(1, 6))
    ):
        raise AccountError(
            f"invalid account name {name!r}: 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter and not ending with '-', neither a MAC address nor its first groups, and not "
            "starting with 'device_' or 'provision'"
        )
    return name


def account_client_id_allowed(name: str, client_id: str) -> bool:
    """A service account connects as NAME or NAME-<anything> (several connections per back end),
    never with a client id that reads as a MAC: that one is a provisioning session's (an account
    named ``ab``, made before such names were refused, would own ``ab-cd-ef-01-23-45``)."""
    own = client_id == name or client_id.startswith(name + "-")
    return own and identity_from_client_id(client_id) is None


def client_ids_overlap(name: str, other: str) -> bool:
    """True when one account's client ids (NAME, NAME-<anything>) could be the other's: one name
    followed by '-' begins the other, as ``telemetry`` and ``telemetry-reader``."""
    return name == other or name.startswith(other + "-") or other.startswith(name + "-")


class AccountRegistry(Repository):
    """Create, read, rotate and remove service accounts."""

    async def add(self, name: str, password_hash: str, rules: Sequence[TopicRule]) -> AccountInfo:
        """Create an account; :class:`AccountExistsError` if the name is taken, or if its client ids
        could be another account's (``telemetry`` and ``telemetry-reader``: ``telemetry-reader-1``
        would be a client id of both, and one back end could throw the other off)."""
        validate_account_name(name)
        async with self._read() as session:
            names = (await session.scalars(select(ServiceAccount.name))).all()
        overlapping = sorted(other for other in names if other != name and client_ids_overlap(name, other))
        if overlapping:
            raise AccountExistsError(
                f"a service account named {overlapping[0]!r} would share client ids with {name!r} "
                "(each connects as NAME or NAME-<anything>): choose a name that neither begins with "
                "nor is begun by another account's name and '-'"
            )
        row = ServiceAccount(
            name=name,
            password_hash=password_hash,
            rules=[r.model_dump() for r in rules],
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        try:
            async with self._write() as session:
                session.add(row)
        except IntegrityError as exc:
            raise AccountExistsError(f"a service account named {name!r} already exists") from exc
        logger.info("service account added name=%s rules=%d", name, len(rules))
        return AccountInfo.from_row(row)

    async def find(self, name: str) -> AccountCredentials | None:
        """The account, its hash and its verifier, or None."""
        query = (
            select(ServiceAccount, CredentialVerifier)
            .outerjoin(CredentialVerifier, CredentialVerifier.username == ServiceAccount.name)
            .where(ServiceAccount.name == name)
        )
        async with self._read() as session:
            found = (await session.execute(query)).first()
            return None if found is None else AccountCredentials.from_rows(found[0], found[1])

    async def list_accounts(self) -> list[AccountInfo]:
        """Every account, by name."""
        async with self._read() as session:
            rows = (await session.scalars(select(ServiceAccount).order_by(ServiceAccount.name))).all()
            return [AccountInfo.from_row(r) for r in rows]

    async def rotate(self, name: str, password_hash: str) -> AccountInfo:
        """Replace the password; live sessions using the old one are disconnected."""
        async with self._write() as session:
            row = await session.get(ServiceAccount, name, with_for_update=True)
            if row is None:
                raise AccountNotFoundError(f"no service account named {name!r}")
            row.password_hash = password_hash
            row.updated_at = utcnow()
            await record_change(session, name, "rotated")
            info = AccountInfo.from_row(row)
        logger.info("service account rotated name=%s", name)
        return info

    async def remove(self, name: str) -> None:
        """Delete the account; live sessions are disconnected."""
        async with self._write() as session:
            result = await session.execute(delete(ServiceAccount).where(ServiceAccount.name == name))
            if getattr(result, "rowcount", 0) != 1:
                raise AccountNotFoundError(f"no service account named {name!r}")
            await record_change(session, name, "removed")
        logger.info("service account removed name=%s", name)
