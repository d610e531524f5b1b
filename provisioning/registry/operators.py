"""Operators of the console and their sessions.

An operator is a name and a bcrypt hash (``mqttprov operators add``). A console session is a
random id in the browser's cookie; the registry keeps only its SHA-256 (the id has 256 random
bits: its digest cannot be reversed, and a lookup by digest is one indexed read), so a copy of the
database opens no session. Sessions live in the registry, not in a process: they survive a
restart, and a logout or ``operators remove`` ends them in every process at once. A session ends
after :data:`IDLE` without a request, and :data:`ABSOLUTE` after its login whatever happens.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from provisioning.errors import ProvisioningError
from provisioning.registry.models import Operator, OperatorSession, utcnow
from provisioning.registry.schemas import aware
from provisioning.registry.transactions import Repository

logger = logging.getLogger(__name__)

#: A session ends after this long without a request...
IDLE = timedelta(minutes=30)
#: ...and this long after its login in any case.
ABSOLUTE = timedelta(hours=12)
#: ``last_seen_at`` is written at most this often: a page view must not cost a write each time.
TOUCH_EVERY = timedelta(minutes=1)
#: The shortest password ``operators add`` accepts.
MIN_PASSWORD = 12
NAME_MAX = 64

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")


class OperatorError(ProvisioningError):
    """An operator operation was refused (an invalid name or password)."""

    error_code = "INVALID_OPERATOR"


class OperatorNotFoundError(OperatorError, LookupError):
    """No operator has this name."""

    error_code = "NOT_FOUND"


class OperatorExistsError(OperatorError):
    """An operator with this name already exists."""

    error_code = "ALREADY_EXISTS"


def validate_operator_name(name: str) -> str:
    """``name``, or :class:`OperatorError` when it is not 1-64 letters, digits, '_', '.', '-'."""
    if not _NAME.fullmatch(name):
        raise OperatorError(
            f"invalid operator name {name[: NAME_MAX + 8]!r}: 1-{NAME_MAX} letters, digits, '_', '.' "
            "or '-', starting with a letter"
        )
    return name


def validate_operator_password(password: str) -> str:
    """``password``, or :class:`OperatorError` when it is too short to be one a person chose well."""
    if len(password) < MIN_PASSWORD:
        raise OperatorError(f"an operator's password needs at least {MIN_PASSWORD} characters")
    return password


class OperatorInfo(BaseModel):
    """An operator as the CLI and the console show it (never the hash)."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    name: str
    created_at: datetime
    last_login_at: datetime | None

    @classmethod
    def from_row(cls, row: Operator) -> OperatorInfo:
        """Build the view from an ORM row."""
        created_at = aware(row.created_at)
        assert created_at is not None
        return cls(id=row.id, name=row.name, created_at=created_at, last_login_at=aware(row.last_login_at))


@dataclass(frozen=True)
class OperatorLogin:
    """An operator with its hash: for the console's login check only."""

    operator: OperatorInfo
    password_hash: str = field(repr=False)


@dataclass(frozen=True)
class ConsoleSession:
    """A live console session: who it is, and the token its forms must carry."""

    operator: OperatorInfo
    csrf_token: str = field(repr=False)
    created_at: datetime


@dataclass(frozen=True)
class StartedSession:
    """A session just opened: the id for the cookie (never stored) and the session."""

    session_id: str = field(repr=False)
    session: ConsoleSession


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class OperatorStore(Repository):
    """Operators (create, list, remove) and their console sessions (open, check, end)."""

    async def add(self, name: str, password_hash: str) -> OperatorInfo:
        """A new operator; :class:`OperatorExistsError` when the name is taken."""
        validate_operator_name(name)
        row = Operator(id=uuid.uuid4(), name=name, password_hash=password_hash, created_at=utcnow())
        try:
            async with self._write() as session:
                session.add(row)
        except IntegrityError as exc:
            raise OperatorExistsError(f"an operator named {name!r} already exists") from exc
        logger.info("operator added name=%s", name)
        return OperatorInfo.from_row(row)

    async def list_operators(self) -> list[OperatorInfo]:
        """Every operator, by name."""
        async with self._read() as session:
            rows = (await session.scalars(select(Operator).order_by(Operator.name))).all()
            return [OperatorInfo.from_row(r) for r in rows]

    async def remove(self, name: str) -> OperatorInfo:
        """Delete the operator and end every session of theirs, in every process."""
        async with self._write() as session:
            row = await session.scalar(select(Operator).where(Operator.name == name).with_for_update())
            if row is None:
                raise OperatorNotFoundError(f"no operator named {name!r}")
            info = OperatorInfo.from_row(row)
            # Explicit, not only the foreign key's cascade: SQLite enforces it only when asked to.
            await session.execute(delete(OperatorSession).where(OperatorSession.operator_id == row.id))
            await session.execute(delete(Operator).where(Operator.id == row.id))
        logger.info("operator removed name=%s", name)
        return info

    async def find_login(self, name: str) -> OperatorLogin | None:
        """The operator named ``name`` and its hash, or None."""
        if len(name) > NAME_MAX or not _NAME.fullmatch(name):
            return None
        async with self._read() as session:
            row = await session.scalar(select(Operator).where(Operator.name == name))
            return None if row is None else OperatorLogin(OperatorInfo.from_row(row), row.password_hash)

    async def start_session(self, operator: OperatorInfo) -> StartedSession:
        """Open a session for an operator whose password was just checked."""
        session_id = secrets.token_urlsafe(32)
        now = utcnow()
        row = OperatorSession(
            digest=_digest(session_id),
            operator_id=operator.id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
        )
        async with self._write() as session:
            # Sessions that expired and were never presented again go here, at the next login.
            stale = (OperatorSession.last_seen_at < now - IDLE) | (
                OperatorSession.created_at < now - ABSOLUTE
            )
            await session.execute(delete(OperatorSession).where(stale))
            session.add(row)
            await session.execute(
                update(Operator).where(Operator.id == operator.id).values(last_login_at=now)
            )
        logger.info("console login operator=%s", operator.name)
        return StartedSession(session_id, ConsoleSession(operator, row.csrf_token, now))

    async def session(self, session_id: str) -> ConsoleSession | None:
        """The live session whose cookie holds ``session_id``; None when unknown, ended or expired."""
        if not _SESSION_ID.fullmatch(session_id):
            return None
        digest = _digest(session_id)
        query = (
            select(OperatorSession, Operator)
            .join(Operator, Operator.id == OperatorSession.operator_id)
            .where(OperatorSession.digest == digest)
        )
        async with self._read() as session:
            found = (await session.execute(query)).first()
        if found is None:
            return None
        row, operator = found
        now = utcnow()
        created, seen = aware(row.created_at), aware(row.last_seen_at)
        assert created is not None
        assert seen is not None
        if now - seen >= IDLE or now - created >= ABSOLUTE:
            await self._end(digest)
            logger.info("console session expired operator=%s", operator.name)
            return None
        if now - seen >= TOUCH_EVERY:
            async with self._write() as session:
                await session.execute(
                    update(OperatorSession).where(OperatorSession.digest == digest).values(last_seen_at=now)
                )
        return ConsoleSession(OperatorInfo.from_row(operator), row.csrf_token, created)

    async def end_session(self, session_id: str) -> None:
        """Log out: the session is refused from the next request on, in every process."""
        if _SESSION_ID.fullmatch(session_id):
            await self._end(_digest(session_id))

    async def _end(self, digest: str) -> None:
        async with self._write() as session:
            await session.execute(delete(OperatorSession).where(OperatorSession.digest == digest))
