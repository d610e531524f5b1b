"""The configuration package's single error type."""


class ConfigError(Exception):
    """The configuration cannot be used; ``str(exc)`` is one line for the operator."""
