"""Read and write transactions shared by the registry's repositories, and the change feed."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from provisioning.errors import ProvisioningError, RegistryUnavailableError
from provisioning.registry.engine import WRITE_OPTION
from provisioning.registry.models import CredentialChange, CredentialVerifier

#: PostgreSQL NOTIFY channel that wakes every broker's change follower at once.
CHANGES_CHANNEL = "mqttprov_credential_changes"
#: ``AsyncSession.info`` key of the usernames whose credentials the transaction changed.
_CHANGED_KEY = "mqttprov.changed_usernames"

ChangeWatcher = Callable[[frozenset[str]], None]
# Watchers per engine (one engine per process, shared by every repository): told right after a
# commit that changed credentials, so this process need not wait for its own change feed. Held
# weakly: a watcher's owner holds the engine, and a strong reference here would keep both alive.
_watchers: weakref.WeakKeyDictionary[object, list[weakref.WeakMethod[ChangeWatcher]]] = (
    weakref.WeakKeyDictionary()
)


def watch_changes(engine: AsyncEngine, watcher: ChangeWatcher) -> None:
    """Call the bound method ``watcher`` with the changed usernames after each commit through
    ``engine``, for as long as its object lives."""
    _watchers.setdefault(engine.sync_engine, []).append(weakref.WeakMethod(watcher))


def _tell_watchers(engine: AsyncEngine, changed: frozenset[str]) -> None:
    watchers = _watchers.get(engine.sync_engine)
    if not watchers:
        return
    watchers[:] = [ref for ref in watchers if ref() is not None]
    for ref in watchers:
        watcher = ref()
        if watcher is not None:
            watcher(changed)


class Repository:
    """Base of the registry's repositories: one engine, short transactions, readable errors.

    The engine is owned by the caller (one per process); :meth:`close` disposes it.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @property
    def engine(self) -> AsyncEngine:
        """The engine this repository uses."""
        return self._engine

    async def close(self) -> None:
        """Dispose the engine's connection pool."""
        await self._engine.dispose()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session, translated_errors():
            yield session

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session, translated_errors():
            async with session.begin():
                # Procured with the option before BEGIN is emitted (see engine._on_begin).
                await session.connection(execution_options={WRITE_OPTION: True})
                yield session
            changed: set[str] | None = session.info.pop(_CHANGED_KEY, None)
        if changed:
            _tell_watchers(self._engine, frozenset(changed))

    async def changes_since(self, last_id: int, *, limit: int = 1000) -> list[tuple[int, str, str]]:
        """Credential changes after ``last_id``, oldest first: ``(id, username, kind)``."""
        query = (
            select(CredentialChange.id, CredentialChange.username, CredentialChange.kind)
            .where(CredentialChange.id > last_id)
            .order_by(CredentialChange.id)
            .limit(limit)
        )
        async with self._read() as session:
            return [(row.id, row.username, row.kind) for row in (await session.execute(query)).all()]

    async def last_change_id(self) -> int:
        """The newest change's id (0 when there is none)."""
        async with self._read() as session:
            return int(await session.scalar(select(func.coalesce(func.max(CredentialChange.id), 0))) or 0)


async def record_change(session: AsyncSession, username: str, kind: str) -> None:
    """Add a change-feed row in the caller's transaction (and wake followers on PostgreSQL).

    The credential's verifier is deleted in the same transaction: every change to a credential
    goes through here, so no verifier outlives the credential it was made for.
    """
    await session.execute(delete(CredentialVerifier).where(CredentialVerifier.username == username))
    session.add(CredentialChange(username=username, kind=kind))
    session.info.setdefault(_CHANGED_KEY, set()).add(username)
    if session.get_bind().dialect.name == "postgresql":
        # Delivered at commit, and only if the transaction commits.
        await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANGES_CHANNEL})


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Turn driver failures into :class:`RegistryUnavailableError` with one readable line."""
    try:
        yield
    except (ProvisioningError, IntegrityError):
        raise
    except DBAPIError as exc:
        message = str(exc.orig) if exc.orig is not None else str(exc)
        if "no such table" in message or ("does not exist" in message and "relation" in message):
            raise RegistryUnavailableError("database is not initialised: run `mqttprov db upgrade`") from exc
        raise RegistryUnavailableError(f"database error: {message.splitlines()[0]}") from exc
    except (SQLAlchemyError, OSError) as exc:
        raise RegistryUnavailableError(f"database unavailable: {exc}") from exc
