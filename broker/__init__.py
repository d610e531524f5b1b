"""Assemble and run mqttprov: the embedded broker, its plugins and the operator CLI."""

from broker.errors import ServeError
from broker.server import BrokerServer, serve

__all__ = ["BrokerServer", "ServeError", "serve"]
