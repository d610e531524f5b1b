"""Errors of the provisioning package: one root, subclasses carry a stable ``error_code``."""

from __future__ import annotations


class ProvisioningError(Exception):
    """Root of every error raised by :mod:`provisioning`; ``str(exc)`` is one line for a person."""

    error_code = "INTERNAL"


class InvalidMacError(ProvisioningError, ValueError):
    """The text is not a MAC address in a notation we accept."""

    error_code = "INVALID_MAC"


class DeviceNotFoundError(ProvisioningError, LookupError):
    """No device matches the given id, MAC or username."""

    error_code = "NOT_FOUND"


class DeviceExistsError(ProvisioningError):
    """A device with this MAC (or username) already exists."""

    error_code = "ALREADY_EXISTS"


class InvalidTransitionError(ProvisioningError):
    """The device's current status does not allow the requested change."""

    error_code = "INVALID_TRANSITION"


class RegistryUnavailableError(ProvisioningError):
    """The registry's database cannot be reached or used."""

    error_code = "INTERNAL"


class ConcurrentChangeError(ProvisioningError):
    """Somebody else changed the device first (another session, process or broker)."""

    error_code = "RATE_LIMITED"


class UnusablePasswordError(ProvisioningError, ValueError):
    """bcrypt cannot take this password (over 72 bytes or containing NUL): refuse it cleanly."""

    error_code = "BAD_PASSWORD"
