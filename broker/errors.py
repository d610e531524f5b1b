"""Errors of the broker package (assembly and serving)."""

#: Message of the exception that ends a refused or timed-out connection: amqtt logs it, and
#: :mod:`broker.logs` drops amqtt's line for it (we log the refusal once ourselves).
REFUSED_MARKER = "mqttprov: connection refused"


class ServeError(Exception):
    """The broker cannot be started or run; ``str(exc)`` is one line for the operator."""
