"""API tokens: the bearer secrets of the HTTP management API, each with explicit scopes.

A secret is ``mqp_`` and 256 random bits in URL-safe base64, shown once when it is created. The
registry keeps only its SHA-256 digest: a secret of 256 random bits cannot be guessed or
brute-forced from its digest, so a fast hash is as safe as bcrypt here, and it lets every request
find its token by an indexed lookup instead of paying a bcrypt check. Nothing is cached: a
revoked token (its row deleted) is refused by the next request in every process.
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import logging
import re
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_serializer,
)
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from provisioning.errors import ProvisioningError, RegistryUnavailableError
from provisioning.registry.models import ApiToken, utcnow
from provisioning.registry.schemas import aware
from provisioning.registry.transactions import Repository

logger = logging.getLogger(__name__)

#: What every secret starts with: recognisable in a leaked log or a secret scanner's rules.
SECRET_PREFIX = "mqp_"  # noqa: S105 - a public prefix, not a secret
_SECRET_BYTES = 32
_SECRET = re.compile(re.escape(SECRET_PREFIX) + r"[A-Za-z0-9_-]{43}")
#: ``last_used_at`` is written at most this often per token: a request must not cost a write.
LAST_USED_EVERY = timedelta(minutes=1)
NAME_MAX = 64


class Scope(enum.StrEnum):
    """What a token may do. Scopes are explicit: ``write`` does not imply ``read``."""

    READ = "read"
    WRITE = "write"
    PROVISION = "provision"


def _not_an_id(name: str) -> str:
    # ``revoke`` takes a name or an id: a name that reads as an id would be ambiguous.
    try:
        uuid.UUID(name)
    except ValueError:
        return name
    raise ValueError("a token name must not be a UUID")


#: 1-64 letters, digits, '_', '.' or '-', starting with a letter; not a UUID.
TokenName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$", min_length=1, max_length=NAME_MAX),
    AfterValidator(_not_an_id),
]


class TokenError(ProvisioningError):
    """A token operation was refused (an invalid name or scope set)."""

    error_code = "INVALID_TOKEN"


class TokenNotFoundError(TokenError, LookupError):
    """No token has this name or id."""

    error_code = "NOT_FOUND"


class TokenExistsError(TokenError):
    """A token with this name already exists."""

    error_code = "ALREADY_EXISTS"


def _sorted_scopes(scopes: frozenset[Scope]) -> list[str]:
    return [scope.value for scope in Scope if scope in scopes]


class TokenRequest(BaseModel):
    """What creating a token takes, validated: a name and at least one scope."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TokenName
    scopes: frozenset[Scope] = Field(min_length=1)

    @field_serializer("scopes")
    def _scopes_in_order(self, scopes: frozenset[Scope]) -> list[str]:
        return _sorted_scopes(scopes)


class ApiTokenInfo(BaseModel):
    """A token as operators and the HTTP layer see it (never the secret nor its digest)."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    name: str
    scopes: frozenset[Scope]
    created_at: datetime
    last_used_at: datetime | None

    def allows(self, scope: Scope) -> bool:
        """True when the token holds ``scope`` (no scope implies another)."""
        return scope in self.scopes

    @field_serializer("scopes")
    def _scopes_in_order(self, scopes: frozenset[Scope]) -> list[str]:
        return _sorted_scopes(scopes)

    @classmethod
    def from_row(cls, row: ApiToken) -> ApiTokenInfo:
        """Build the view from an ORM row."""
        created_at = aware(row.created_at)
        assert created_at is not None
        return cls(
            id=row.id,
            name=row.name,
            scopes=frozenset(Scope(s) for s in row.scopes),
            created_at=created_at,
            last_used_at=aware(row.last_used_at),
        )


class IssuedToken(BaseModel):
    """A token just created, with its secret: shown once, never stored."""

    model_config = ConfigDict(frozen=True)

    token: ApiTokenInfo
    secret: str = Field(repr=False)


def secret_digest(secret: str) -> str:
    """The hex SHA-256 of a secret, as stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_token_request(name: str, scopes: frozenset[Scope] | builtins.list[str]) -> TokenRequest:
    """The request, or :class:`TokenError` saying in one line what is wrong with it."""
    try:
        return TokenRequest.model_validate({"name": name, "scopes": scopes})
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(part) for part in problem["loc"][:1]) or "token"
        if field == "name":
            raise TokenError(
                f"invalid token name {name[: NAME_MAX + 8]!r}: 1-{NAME_MAX} letters, digits, '_', '.' or "
                "'-', starting with a letter, and not a UUID"
            ) from exc
        known = ", ".join(s.value for s in Scope)
        raise TokenError(f"invalid scopes: give at least one of {known}") from exc


class TokenStore(Repository):
    """Create, list, revoke and check API tokens."""

    async def create(self, name: str, scopes: frozenset[Scope]) -> IssuedToken:
        """A new token and its secret; :class:`TokenExistsError` when the name is taken."""
        request = validate_token_request(name, scopes)
        secret = SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        row = ApiToken(
            id=uuid.uuid4(),
            name=request.name,
            digest=secret_digest(secret),
            scopes=_sorted_scopes(request.scopes),
            created_at=utcnow(),
        )
        try:
            async with self._write() as session:
                session.add(row)
        except IntegrityError as exc:
            raise TokenExistsError(f"an API token named {request.name!r} already exists") from exc
        info = ApiTokenInfo.from_row(row)
        logger.info("api token created name=%s id=%s scopes=%s", info.name, info.id, ",".join(row.scopes))
        return IssuedToken(token=info, secret=secret)

    async def list(self) -> builtins.list[ApiTokenInfo]:
        """Every token, by name."""
        async with self._read() as session:
            rows = (await session.scalars(select(ApiToken).order_by(ApiToken.name))).all()
            return [ApiTokenInfo.from_row(r) for r in rows]

    async def revoke(self, name_or_id: str | uuid.UUID) -> ApiTokenInfo:
        """Delete the token named (or with the id) ``name_or_id``: refused from the next request on."""
        token_id = _as_id(name_or_id)
        where = ApiToken.name == str(name_or_id) if token_id is None else ApiToken.id == token_id
        async with self._write() as session:
            row = await session.scalar(select(ApiToken).where(where).with_for_update())
            if row is None:
                raise TokenNotFoundError(f"no API token named (or with id) {str(name_or_id)!r}")
            info = ApiTokenInfo.from_row(row)
            await session.execute(delete(ApiToken).where(ApiToken.id == row.id))
        logger.info("api token revoked name=%s id=%s", info.name, info.id)
        return info

    async def authenticate(self, secret: str) -> ApiTokenInfo | None:
        """The token whose secret this is, or None (unknown, revoked or malformed).

        The lookup is by the secret's digest: how long it takes tells nothing about the secret.
        """
        if not _SECRET.fullmatch(secret):
            return None
        async with self._read() as session:
            row = await session.scalar(select(ApiToken).where(ApiToken.digest == secret_digest(secret)))
            info = None if row is None else ApiTokenInfo.from_row(row)
        if info is None:
            return None
        now = utcnow()
        if info.last_used_at is None or now - info.last_used_at >= LAST_USED_EVERY:
            await self._touch(info.id, now)
            info = info.model_copy(update={"last_used_at": now})
        return info

    async def _touch(self, token_id: uuid.UUID, now: datetime) -> None:
        # Conditional: of many processes seeing a stale time at once, one writes. Best effort: a
        # read-only or struggling database must not refuse a valid token for want of a timestamp.
        statement = (
            update(ApiToken)
            .where(
                ApiToken.id == token_id,
                or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < now - LAST_USED_EVERY),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        try:
            async with self._write() as session:
                await session.execute(statement)
        except RegistryUnavailableError as exc:
            logger.info("api token last use not recorded id=%s: %s", token_id, exc)


def _as_id(name_or_id: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(name_or_id, uuid.UUID):
        return name_or_id
    try:
        return uuid.UUID(name_or_id)
    except ValueError:
        return None
