"""The device registry: models, engine and the repository every other component uses."""

from provisioning.registry.engine import create_engine
from provisioning.registry.labels import (
    MAX_LABELS,
    InvalidLabelError,
    LabelKey,
    LabelValue,
    parse_label,
    parse_labels,
)
from provisioning.registry.models import ACTIVE_STATUSES, Actor, Base, Device, DeviceEvent, DeviceStatus
from provisioning.registry.repository import DeviceRegistry, username_for
from provisioning.registry.schemas import DeviceCredentials, DeviceEventInfo, DeviceInfo, DevicePage
from provisioning.registry.search import MAX_PAGE, DeviceFilter, DeviceSearch, InvalidFilterError
from provisioning.registry.tokens import (
    ApiTokenInfo,
    IssuedToken,
    Scope,
    TokenError,
    TokenExistsError,
    TokenNotFoundError,
    TokenRequest,
    TokenStore,
)

__all__ = [
    "ACTIVE_STATUSES",
    "MAX_LABELS",
    "MAX_PAGE",
    "Actor",
    "ApiTokenInfo",
    "Base",
    "Device",
    "DeviceCredentials",
    "DeviceEvent",
    "DeviceEventInfo",
    "DeviceFilter",
    "DeviceInfo",
    "DevicePage",
    "DeviceRegistry",
    "DeviceSearch",
    "DeviceStatus",
    "InvalidFilterError",
    "InvalidLabelError",
    "IssuedToken",
    "LabelKey",
    "LabelValue",
    "Scope",
    "TokenError",
    "TokenExistsError",
    "TokenNotFoundError",
    "TokenRequest",
    "TokenStore",
    "create_engine",
    "parse_label",
    "parse_labels",
    "username_for",
]
