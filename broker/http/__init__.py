"""HTTP services: authd (auth callbacks of external brokers) and the management API (``api/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.http.authd import AuthdServer, run_authd

__all__ = ["AuthdServer", "run_authd"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: authd's aiohttp is not for the management API, nor the API's for authd.
    if name in __all__:
        from broker.http import authd  # noqa: PLC0415

        return getattr(authd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
