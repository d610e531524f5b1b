"""The device registry: models, engine and the repository every other component uses."""

from provisioning.registry.engine import create_engine
from provisioning.registry.models import ACTIVE_STATUSES, Actor, Base, Device, DeviceEvent, DeviceStatus
from provisioning.registry.repository import DeviceRegistry, username_for
from provisioning.registry.schemas import DeviceCredentials, DeviceEventInfo, DeviceInfo, DevicePage

__all__ = [
    "ACTIVE_STATUSES",
    "Actor",
    "Base",
    "Device",
    "DeviceCredentials",
    "DeviceEvent",
    "DeviceEventInfo",
    "DeviceInfo",
    "DevicePage",
    "DeviceRegistry",
    "DeviceStatus",
    "create_engine",
    "username_for",
]
