"""Assemble and run mqttprov: the embedded broker, its plugins and the operator CLI."""

from broker.packages import require_amqtt_pin, require_own_packages

require_own_packages()  # before anything imports a package that could be another's
require_amqtt_pin()

from broker.errors import ServeError  # noqa: E402 - after the check above
from broker.server import BrokerServer, serve  # noqa: E402

__all__ = ["BrokerServer", "ServeError", "serve"]
