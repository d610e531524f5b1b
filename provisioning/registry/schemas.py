"""Typed, ORM-free views of registry rows: what the rest of the code passes around."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Row

from provisioning.registry.models import CredentialVerifier, Device, DeviceEvent, DeviceStatus


def aware(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime."""
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True, slots=True)
class StoredVerifier:
    """A verifier as stored: for the credential ``tag``, made under the key ``key_id``."""

    tag: str
    key_id: str
    digest: str = field(repr=False)

    @classmethod
    def from_row(cls, row: CredentialVerifier | None) -> StoredVerifier | None:
        """The verifier of a row read beside its credential (None when there is none)."""
        return None if row is None else cls(row.tag, row.key_id, row.digest)


class _View(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class DeviceInfo(_View):
    """A device as the CLI and services see it: every column except the password hash."""

    id: uuid.UUID
    mac: str
    mqtt_username: str
    status: DeviceStatus
    firmware_version: str | None
    sensor_types: list[str]
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    activated_at: datetime | None
    credentials_issued_at: datetime | None
    note: str | None
    has_credentials: bool
    #: ``key=value`` labels (:mod:`provisioning.registry.labels`). Read with every view operators
    #: get; not on the login and provisioning paths (``DeviceCredentials``, ``issue_credentials``,
    #: ``set_status``), which never need them: empty there.
    labels: dict[str, str] = Field(default_factory=dict)

    _aware_times = field_validator(
        "created_at", "updated_at", "last_seen_at", "activated_at", "credentials_issued_at", mode="after"
    )(aware)

    @classmethod
    def from_row(cls, row: Device | Row[Any], labels: Mapping[str, str] | None = None) -> DeviceInfo:
        """Build the view from an ORM row or a row of the ``devices`` table (never the hash), and
        the device's labels if they were read.

        The columns are already typed by the table (and its CHECK constraint): the view is built
        without a second validation, which is most of what a page of devices used to cost.
        """
        created_at, updated_at = aware(row.created_at), aware(row.updated_at)
        assert created_at is not None
        assert updated_at is not None
        return cls.model_construct(
            id=row.id,
            mac=row.mac,
            mqtt_username=row.mqtt_username,
            status=DeviceStatus(row.status),
            firmware_version=row.firmware_version,
            sensor_types=list(row.sensor_types or []),
            created_at=created_at,
            updated_at=updated_at,
            last_seen_at=aware(row.last_seen_at),
            activated_at=aware(row.activated_at),
            credentials_issued_at=aware(row.credentials_issued_at),
            note=row.note,
            has_credentials=row.password_hash is not None,
            labels=dict(labels) if labels else {},
        )


class DeviceEventInfo(_View):
    """One audit record (folded repeats carry ``count`` and ``last_at``)."""

    id: int
    device_id: uuid.UUID | None
    mac: str | None
    kind: str
    actor: str
    detail: dict[str, Any]
    created_at: datetime
    last_at: datetime
    count: int

    _aware_times = field_validator("created_at", "last_at", mode="after")(aware)

    @classmethod
    def from_row(cls, row: DeviceEvent) -> DeviceEventInfo:
        """Build the view from an ORM row."""
        return cls.model_validate(row)


class DevicePage(_View):
    """One page of a device listing and the total matching the filter."""

    devices: list[DeviceInfo]
    total: int
    #: Pass as ``after`` for the next page (a keyset cursor); None when this page is the last.
    next_cursor: str | None = None


class DeviceCredentials(_View):
    """A device with its password hash: for the provisioning and auth services only, never rendered."""

    device: DeviceInfo
    password_hash: str | None = Field(repr=False)
    #: The stored verifier of this credential, if one was made (``credential_verifiers``).
    verifier: StoredVerifier | None = Field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: Device, verifier: CredentialVerifier | None = None) -> DeviceCredentials:
        """Build the view from an ORM row (and the row of its verifier, if read with it)."""
        return cls.model_construct(
            device=DeviceInfo.from_row(row),
            password_hash=row.password_hash,
            verifier=StoredVerifier.from_row(verifier),
        )
