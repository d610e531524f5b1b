"""Errors of the broker package (assembly and serving)."""


class ServeError(Exception):
    """The broker cannot be started or run; ``str(exc)`` is one line for the operator."""
