"""SQLAlchemy models of the device registry: ``devices``, the append-only ``device_events`` and
the tables that serve them."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so that Alembic migrations agree on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class DeviceStatus(enum.StrEnum):
    """Life cycle of a device, as stored in ``devices.status``."""

    PENDING = "pending"  # waiting for an operator (approval mode)
    APPROVED = "approved"  # allowed to enrol (approved or allow-listed); credentials on the next request
    REJECTED = "rejected"  # an operator said no; requests get NOT_ALLOWED
    REGISTERED = "registered"  # credentials issued, never logged in since
    ONLINE = "online"
    OFFLINE = "offline"
    DECOMMISSIONED = "decommissioned"  # credentials dead for good


ACTIVE_STATUSES = frozenset({DeviceStatus.REGISTERED, DeviceStatus.ONLINE, DeviceStatus.OFFLINE})


class Actor(enum.StrEnum):
    """Who caused an event."""

    DEVICE = "device"
    OPERATOR = "operator"
    SYSTEM = "system"


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the registry uses."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in DeviceStatus)


class Device(Base):
    """One physical device, known by its MAC."""

    __tablename__ = "devices"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status_valid"),
        # Pages are ordered by (created_at, id): with these, a page is an index range scan
        # instead of a sort of every matching row (the registry benchmark at 100k devices).
        Index("ix_devices_status_created", "status", "created_at", "id"),
        Index("ix_devices_created", "created_at", "id"),
        # Prefix searches (provisioning.registry.search): PostgreSQL compares them byte-wise with
        # its pattern operators, which only a pattern_ops index serves; on SQLite these are
        # plain indexes beside the unique ones (migration 0009).
        Index("ix_devices_mac_prefix", "mac", postgresql_ops={"mac": "varchar_pattern_ops"}),
        Index(
            "ix_devices_username_prefix",
            "mqtt_username",
            postgresql_ops={"mqtt_username": "varchar_pattern_ops"},
        ),
        # The event stream follows presence writes in this order (migration 0012).
        Index("ix_devices_last_seen_at_id", "last_seen_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    mqtt_username: Mapped[str] = mapped_column(String(64), unique=True)
    # bcrypt only; NULL until credentials are issued. The plaintext is never stored.
    password_hash: Mapped[str | None] = mapped_column(String(60), default=None)
    status: Mapped[str] = mapped_column(String(16))
    firmware_version: Mapped[str | None] = mapped_column(String(64), default=None)
    sensor_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    activated_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the current credentials were issued (drives the reissue cool-down).
    credentials_issued_at: Mapped[datetime | None] = mapped_column(default=None)
    note: Mapped[str | None] = mapped_column(String(256), default=None)


class DeviceStatusCount(Base):
    """A signed change of the number of devices in one status, appended by triggers on ``devices``.

    The number of devices in a status is the sum of its rows; see
    :mod:`provisioning.registry.status_counts` (the triggers, reading, compaction).
    """

    __tablename__ = "device_status_counts"
    __table_args__ = (Index("ix_device_status_counts_status", "status"),)

    # 64 bits: every status change takes two ids, so a busy fleet would run out of 32 bits.
    # SQLite's 64-bit rowid is an INTEGER PRIMARY KEY only when spelled INTEGER.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    status: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)


class DeviceEvent(Base):
    """Append-only audit record. Never holds a secret.

    ``device_id`` is deliberately not a foreign key: the audit trail outlives a deleted device.
    Repeated identical events that are foldable (refusals) share a row keyed by ``fold_key``;
    ``count`` and ``last_at`` say how often and until when they happened.
    """

    __tablename__ = "device_events"
    __table_args__ = (
        Index("ix_device_events_device_id_id", "device_id", "id"),
        Index("ix_device_events_fold_key", "fold_key"),
        Index("ix_device_events_kind_created_at", "kind", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    mac: Mapped[str | None] = mapped_column(String(17), default=None)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_at: Mapped[datetime] = mapped_column(default=utcnow)
    count: Mapped[int] = mapped_column(Integer, default=1)
    fold_key: Mapped[str | None] = mapped_column(String(64), default=None)


class CredentialChange(Base):
    """A credential changed (issued, reset, decommissioned, deleted, rotated, removed).

    Every broker process follows this table (polled by primary key, woken by NOTIFY on
    PostgreSQL) to drop cached verifications and disconnect sessions whose login is dead.
    """

    __tablename__ = "credential_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServiceAccount(Base):
    """A back end's login: a name, a bcrypt hash and explicit topic rules."""

    __tablename__ = "service_accounts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(60))
    # [{"action": "subscribe" | "publish", "filter": "devices/+/telemetry"}, ...]
    rules: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CredentialVerifier(Base):
    """A keyed verifier of a credential that passed one bcrypt check: later logins cost an HMAC.

    ``digest`` is HMAC-SHA256 under a server key that never lives in the database, over the
    username, the exact stored hash and the password (:mod:`auth_plugin.verifiers`): without the
    key a row is useless for checking a password. A row is used only while ``tag`` names the
    current credential and ``key_id`` the process's key; every change to a credential deletes
    its row in the same transaction (:func:`~provisioning.registry.transactions.record_change`).
    """

    __tablename__ = "credential_verifiers"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Fingerprint of the stored hash it was made for (``auth_plugin.principals.credential_tag``).
    tag: Mapped[str] = mapped_column(String(32))
    #: Fingerprint of the key it was made under (never the key).
    key_id: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token of the HTTP management API: a name, its scopes and the SHA-256 of its secret.

    The secret itself is never stored (:mod:`provisioning.registry.tokens`). Revoking a token
    deletes its row: every request looks its digest up, so it is refused at once everywhere.
    """

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: Hex SHA-256 of the whole secret; unique, so its index serves every authentication.
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    #: Scope names (``read``, ``write``, ``provision``), sorted.
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Updated at most once a minute (:data:`~provisioning.registry.tokens.LAST_USED_EVERY`).
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class DeviceLabel(Base):
    """One ``key=value`` label of a device (:mod:`provisioning.registry.labels`); deleted with it."""

    __tablename__ = "device_labels"
    # Filters ask "which devices have key=value": (key, value) first, the device id to join on.
    __table_args__ = (Index("ix_device_labels_key_value", "key", "value", "device_id"),)

    device_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(63))


class Operator(Base):
    """A person who may use the operator console: a name and a bcrypt hash (``mqttprov operators``)."""

    __tablename__ = "operators"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(60))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)


class OperatorSession(Base):
    """A console login: the SHA-256 of the cookie's random id (never the id), ended by logout,
    by its expiry or with its operator (deleted with it)."""

    __tablename__ = "operator_sessions"
    __table_args__ = (Index("ix_operator_sessions_operator_id", "operator_id"),)

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("operators.id", ondelete="CASCADE"))
    #: The synchronizer token every form of this session carries (not a login secret).
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Written at most once a minute (:data:`~provisioning.registry.operator_sessions.TOUCH_EVERY`).
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
