"""The embedded amqtt broker: every import of amqtt in mqttprov lives in this package."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.packages import require_amqtt_pin

# Before any module of this package imports amqtt: they override its internals (docs/amqtt.md).
require_amqtt_pin()

if TYPE_CHECKING:
    from broker.embedded.server import BrokerServer, serve

__all__ = ["BrokerServer", "serve"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: importing a light module of this package must not load amqtt.
    if name in __all__:
        from broker.embedded import server  # noqa: PLC0415

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
