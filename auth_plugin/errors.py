"""Errors of the auth package."""


class AuthError(Exception):
    """Root of every error raised by :mod:`auth_plugin`."""

    error_code = "INTERNAL"


class UnusablePasswordError(AuthError, ValueError):
    """bcrypt cannot take this password (over 72 bytes or containing NUL): refuse it cleanly."""

    error_code = "BAD_PASSWORD"
