"""Keyed verifiers of credentials, kept beside them: what a login needs instead of bcrypt.

The registry stores and deletes verifiers; it never makes or checks one (that needs the key,
which lives outside the database: :mod:`auth_plugin.verifiers`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from provisioning.registry.accounts import AccountCredentials
from provisioning.registry.models import ACTIVE_STATUSES, CredentialVerifier, Device, ServiceAccount, utcnow
from provisioning.registry.schemas import DeviceCredentials, StoredVerifier
from provisioning.registry.transactions import Repository

__all__ = ["StoredVerifier", "VerifierStore"]


class VerifierStore(Repository):
    """Writes verifiers after a successful bcrypt check."""

    async def save(self, username: str, *, password_hash: str, verifier: StoredVerifier) -> bool:
        """Keep ``verifier`` for ``username`` if ``password_hash`` is still its current hash."""
        return await self.save_many([(username, password_hash, verifier)]) == 1

    async def save_many(self, made: Sequence[tuple[str, str, StoredVerifier]]) -> int:
        """Keep each ``(username, password hash, verifier)`` whose hash is still the username's
        current one, in one transaction; how many were kept.

        A credential changed since the check a verifier was made after gets none; a stale row
        written in a race would not be used anyway: its tag names the old credential.
        """
        usernames = [username for username, _, _ in made]
        async with self._write() as session:
            current: dict[str, str | None] = {}
            for query in (
                select(Device.mqtt_username, Device.password_hash).where(Device.mqtt_username.in_(usernames)),
                select(ServiceAccount.name, ServiceAccount.password_hash).where(
                    ServiceAccount.name.in_(usernames)
                ),
            ):
                current.update(dict((await session.execute(query)).all()))
            rows = [
                {
                    "username": username,
                    "tag": verifier.tag,
                    "key_id": verifier.key_id,
                    "digest": verifier.digest,
                    "created_at": utcnow(),
                }
                for username, password_hash, verifier in made
                if current.get(username) == password_hash
            ]
            if rows:
                insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
                statement = insert(CredentialVerifier).values(rows)
                await session.execute(
                    statement.on_conflict_do_update(
                        index_elements=[CredentialVerifier.username],
                        set_={
                            name: statement.excluded[name]
                            for name in ("tag", "key_id", "digest", "created_at")
                        },
                    )
                )
        return len(rows)

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
