"""Device provisioning: MAC parsing, the device registry, the provisioning service and its MQTT plugin."""

from provisioning.errors import (
    ConcurrentChangeError,
    DeviceExistsError,
    DeviceNotFoundError,
    InvalidMacError,
    InvalidTransitionError,
    ProvisioningError,
    RegistryUnavailableError,
)
from provisioning.mac import is_mac, parse_device_mac, parse_mac

__all__ = [
    "ConcurrentChangeError",
    "DeviceExistsError",
    "DeviceNotFoundError",
    "InvalidMacError",
    "InvalidTransitionError",
    "ProvisioningError",
    "RegistryUnavailableError",
    "is_mac",
    "parse_device_mac",
    "parse_mac",
]
