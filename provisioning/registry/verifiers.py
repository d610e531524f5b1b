"""Keyed verifiers of credentials, kept beside them: what a login needs instead of bcrypt.

The registry stores and deletes verifiers; it never makes or checks one (that needs the key,
which lives outside the database: :mod:`auth_plugin.verifiers`).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from provisioning.registry.accounts import AccountCredentials
from provisioning.registry.models import ACTIVE_STATUSES, CredentialVerifier, Device, ServiceAccount, utcnow
from provisioning.registry.schemas import DeviceCredentials, StoredVerifier
from provisioning.registry.transactions import Repository

__all__ = ["StoredVerifier", "VerifierStore"]


class VerifierStore(Repository):
    """Writes verifiers after a successful bcrypt check."""

    async def save(self, username: str, *, password_hash: str, verifier: StoredVerifier) -> bool:
        """Keep ``verifier`` for ``username`` if ``password_hash`` is still its current hash.

        A credential changed since the check it was made after gets none (False); a stale row
        written in a race would not be used anyway: its tag names the old credential.
        """
        async with self._write() as session:
            if await _current_hash(session, username) != password_hash:
                return False
            values = {
                "username": username,
                "tag": verifier.tag,
                "key_id": verifier.key_id,
                "digest": verifier.digest,
                "created_at": utcnow(),
            }
            insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            statement = insert(CredentialVerifier).values(values)
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[CredentialVerifier.username],
                    set_={
                        name: statement.excluded[name] for name in ("tag", "key_id", "digest", "created_at")
                    },
                )
            )
        return True

    async def verified_devices(self, key_id: str, limit: int) -> list[DeviceCredentials]:
        """Active devices with a verifier made under ``key_id``, most recently seen first."""
        query = (
            select(Device, CredentialVerifier)
            .join(CredentialVerifier, CredentialVerifier.username == Device.mqtt_username)
            .where(
                CredentialVerifier.key_id == key_id,
                Device.status.in_([status.value for status in ACTIVE_STATUSES]),
                Device.password_hash.is_not(None),
            )
            .order_by(Device.last_seen_at.desc().nulls_last())
            .limit(limit)
        )
        async with self._read() as session:
            rows = (await session.execute(query)).all()
            return [DeviceCredentials.from_row(device, verifier) for device, verifier in rows]

    async def verified_accounts(self, key_id: str, limit: int) -> list[AccountCredentials]:
        """Service accounts with a verifier made under ``key_id``."""
        query = (
            select(ServiceAccount, CredentialVerifier)
            .join(CredentialVerifier, CredentialVerifier.username == ServiceAccount.name)
            .where(CredentialVerifier.key_id == key_id)
            .order_by(ServiceAccount.name)
            .limit(limit)
        )
        async with self._read() as session:
            rows = (await session.execute(query)).all()
            return [AccountCredentials.from_rows(account, verifier) for account, verifier in rows]

    async def count(self) -> int:
        """How many verifiers are stored (for operators and tests)."""
        async with self._read() as session:
            return int(await session.scalar(select(func.count()).select_from(CredentialVerifier)) or 0)


async def _current_hash(session: AsyncSession, username: str) -> str | None:
    device_hash = await session.scalar(select(Device.password_hash).where(Device.mqtt_username == username))
    if device_hash is not None:
        return device_hash
    return await session.scalar(select(ServiceAccount.password_hash).where(ServiceAccount.name == username))
