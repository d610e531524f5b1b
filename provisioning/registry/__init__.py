"""The device registry: models, engine and the repository every other component uses."""

from provisioning.registry.engine import create_engine
from provisioning.registry.models import ACTIVE_STATUSES, Actor, Base, Device, DeviceEvent, DeviceStatus
from provisioning.registry.repository import DeviceRegistry, username_for
from provisioning.registry.schemas import DeviceCredentials, DeviceEventInfo, DeviceInfo, DevicePage
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
    "Actor",
    "ApiTokenInfo",
    "Base",
    "Device",
    "DeviceCredentials",
    "DeviceEvent",
    "DeviceEventInfo",
    "DeviceInfo",
    "DevicePage",
    "DeviceRegistry",
    "DeviceStatus",
    "IssuedToken",
    "Scope",
    "TokenError",
    "TokenExistsError",
    "TokenNotFoundError",
    "TokenRequest",
    "TokenStore",
    "create_engine",
    "username_for",
]
