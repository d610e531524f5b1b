"""The provisioning wire contract: topics, the request a device sends and the replies it gets.

This module is the single source of truth for what firmware sees; the README documents it.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from provisioning.errors import InvalidMacError, ProvisioningError
from provisioning.mac import parse_mac

REQUEST_TOPIC = "provision/request"
REPLY_PREFIX = "provision/reply/"
#: Where back ends may follow provisioning (device id, MAC, status, time; never a secret).
EVENT_PREFIX = "mqttprov/events/device/"
#: The username a provisioning session presents with ``fleet_secret`` or ``device_key`` proof.
PROVISION_USERNAME = "provision"
#: Every device's MQTT username starts with this (``device_`` and 12 hex digits of its id).
DEVICE_USERNAME_PREFIX = "device_"

_MAX_REQUEST_ID = 128
_MAX_FIELD = 64
_MAX_SENSORS = 32

# The MAC notations have fixed lengths; a client id may carry ``-suffix`` after one of them.
_MAC_LENGTHS = (17, 14, 12)
_MAX_SUFFIX = 64


class ErrorCode(enum.StrEnum):
    """Every refusal a device can receive in an ``error`` reply."""

    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    INVALID_MAC = "INVALID_MAC"
    MAC_MISMATCH = "MAC_MISMATCH"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    NOT_ALLOWED = "NOT_ALLOWED"
    ALREADY_PROVISIONED = "ALREADY_PROVISIONED"
    DECOMMISSIONED = "DECOMMISSIONED"
    RATE_LIMITED = "RATE_LIMITED"
    #: Not decided now (the registry is unavailable, or no decision within the request's
    #: deadline); nothing was issued to this request. Ask again after ``retry_after``.
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


# Stored and shown to operators: no control characters (PostgreSQL cannot even store NUL in text).
ShortText = Annotated[
    str, StringConstraints(max_length=_MAX_FIELD, strip_whitespace=True, pattern=r"^[^\x00-\x1f\x7f]*$")
]


class ProvisionRequest(BaseModel):
    """The JSON object a device publishes to ``provision/request``; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    mac: Annotated[str, StringConstraints(max_length=64)]
    firmware_version: ShortText | None = None
    sensor_types: Annotated[list[ShortText], Field(max_length=_MAX_SENSORS)] = []
    request_id: Annotated[str, StringConstraints(max_length=_MAX_REQUEST_ID)] | None = None


class _Reply(BaseModel):
    model_config = ConfigDict(frozen=True)

    def to_payload(self) -> bytes:
        """The reply as UTF-8 JSON (``request_id`` omitted when the request had none)."""
        data = self.model_dump(mode="json")
        if data.get("request_id") is None:
            data.pop("request_id", None)
        return json.dumps(data, separators=(",", ":")).encode()


class OkReply(_Reply):
    """Credentials: published once, to the requesting session only, after the commit."""

    status: Literal["ok"] = "ok"
    device_id: uuid.UUID
    mqtt_username: str
    mqtt_password: str
    mqtt_client_id: str
    mqtt_host: str
    mqtt_port: int
    topic_prefix: str
    request_id: str | None = None

    def __repr__(self) -> str:
        # Never let the password reach a log line through a repr.
        return f"OkReply(device_id={self.device_id!s}, mqtt_username={self.mqtt_username!r}, ...)"

    __str__ = __repr__


class PendingReply(_Reply):
    """An operator has not decided yet; ask again after ``retry_after`` seconds."""

    status: Literal["pending"] = "pending"
    retry_after: int
    request_id: str | None = None


class ErrorReply(_Reply):
    """A refusal with a stable ``error_code`` and a human ``detail``; ``retry_after`` (seconds) on
    ``RATE_LIMITED`` and ``UNAVAILABLE``."""

    status: Literal["error"] = "error"
    error_code: ErrorCode
    detail: str
    retry_after: int | None = None
    request_id: str | None = None

    def to_payload(self) -> bytes:
        """As :meth:`_Reply.to_payload`, and ``retry_after`` only where it means something."""
        data = self.model_dump(mode="json")
        for optional in ("request_id", "retry_after"):
            if data.get(optional) is None:
                data.pop(optional, None)
        return json.dumps(data, separators=(",", ":")).encode()


Reply = OkReply | PendingReply | ErrorReply


@dataclass(frozen=True)
class ClientIdentity:
    """What a provisioning session's client id says: the MAC as written, its canonical form."""

    written: str
    mac: str
    suffix: str | None


def identity_from_client_id(client_id: str | None) -> ClientIdentity | None:
    """Parse ``<mac>`` or ``<mac>-<suffix>`` in any accepted notation; None when it is not one."""
    if not client_id:
        return None
    try:
        return ClientIdentity(client_id, parse_mac(client_id), None)
    except InvalidMacError:
        pass
    for length in _MAC_LENGTHS:
        head, sep, suffix = client_id[:length], client_id[length : length + 1], client_id[length + 1 :]
        if sep != "-" or not suffix or len(suffix) > _MAX_SUFFIX or not _safe_suffix(suffix):
            continue
        try:
            return ClientIdentity(head, parse_mac(head), suffix)
        except InvalidMacError:
            continue
    return None


def _safe_suffix(suffix: str) -> bool:
    # Printable ASCII without MQTT wildcards or separators.
    return all(33 <= ord(ch) < 127 and ch not in "+#/" for ch in suffix)


def reply_topic(mac_as_written: str) -> str:
    """``provision/reply/<mac>`` exactly as the device spelled its MAC."""
    return REPLY_PREFIX + mac_as_written


def event_topic(device_id: uuid.UUID) -> str:
    """The topic provisioning events for one device are published on."""
    return f"{EVENT_PREFIX}{device_id}"


def mac_of_reply_filter(topic_filter: str) -> str | None:
    """The canonical MAC a ``provision/reply/<mac>`` filter names, or None (wildcards never match)."""
    if not topic_filter.startswith(REPLY_PREFIX):
        return None
    rest = topic_filter[len(REPLY_PREFIX) :]
    try:
        return parse_mac(rest)
    except InvalidMacError:
        return None


class RequestRefusedError(ProvisioningError):
    """A request that cannot be served; carries what the error reply needs."""

    def __init__(self, code: ErrorCode, detail: str, request_id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.request_id = request_id


def _echoable(request_id: object) -> str | None:
    """A ``request_id`` worth echoing in an error reply: short text that is valid Unicode."""
    if not isinstance(request_id, str) or len(request_id) > _MAX_REQUEST_ID:
        return None
    try:
        request_id.encode("utf-8")  # a lone surrogate (``"\\udfff"`` in JSON) is not text
    except UnicodeEncodeError:
        return None
    return request_id


def decode_request(payload: bytes, *, max_bytes: int) -> ProvisionRequest:
    """Validate a raw payload into a :class:`ProvisionRequest` or raise :class:`RequestRefusedError`."""
    if len(payload) > max_bytes:
        raise RequestRefusedError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_bytes}"
        )
    try:
        data: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestRefusedError(ErrorCode.INVALID_PAYLOAD, "payload is not a UTF-8 JSON object") from exc
    if not isinstance(data, dict):
        raise RequestRefusedError(ErrorCode.INVALID_PAYLOAD, "payload must be a JSON object")
    echo = _echoable(data.get("request_id"))
    try:
        return ProvisionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise RequestRefusedError(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']}", echo) from exc
