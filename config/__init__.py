"""Typed configuration for mqttprov: one TOML file overlaid by ``MQTTPROV_*`` environment variables."""

from config.errors import ConfigError
from config.loader import DEFAULT_CONFIG_FILE, ENV_PREFIX, load_settings
from config.models import (
    AclSettings,
    AuthdSettings,
    AuthSettings,
    BrokerSettings,
    DatabaseSettings,
    ExternalSettings,
    LogSettings,
    MetricsSettings,
    ProvisioningSettings,
    Settings,
)

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "AclSettings",
    "AuthSettings",
    "AuthdSettings",
    "BrokerSettings",
    "ConfigError",
    "DatabaseSettings",
    "ExternalSettings",
    "LogSettings",
    "MetricsSettings",
    "ProvisioningSettings",
    "Settings",
    "load_settings",
]
