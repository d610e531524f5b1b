"""Errors of the auth package."""


class AuthError(Exception):
    """Root of every error raised by :mod:`auth_plugin`."""
