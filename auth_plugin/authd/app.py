"""The aiohttp application: contract routes behind one guard, ``/healthz`` and ``/metrics``.

The guard is where authd fails closed: a caller without the shared secret gets 401; over
``max_concurrent`` requests, past ``request_timeout``, on a malformed body or any exception the
broker gets its contract's "deny", and the failure is logged at ERROR without the request body (it
may hold a password). A request the registry cannot answer now (the database is down) gets the
contract's "not decided" answer, which is "deny" unless the contract has a better one (EMQX
logins: ``ignore``); that is routine, told once per outage by the service, not per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from pydantic import ValidationError

from auth_plugin.authd.metrics import Metrics
from auth_plugin.authd.service import UndecidedError
from config import AuthdSettings

logger = logging.getLogger(__name__)

#: Largest request body: VerneMQ's auth_on_publish carries the message payload (base64).
MAX_BODY_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass(frozen=True)
class Route:
    """One endpoint of a contract, the answer that means "deny" to its broker, and the one that
    means "not decided" (None: deny too)."""

    path: str
    handle: Handler
    deny: Callable[[], web.Response]
    undecided: Callable[[], web.Response] | None = None


class BadRequestError(ValueError):
    """The body is not what the contract says the broker sends."""


@dataclass(frozen=True)
class Contract:
    """A broker's callback contract: its name (a metrics label) and its routes."""

    name: str
    routes: Sequence[Route]


def presented_secret(request: web.Request) -> str | None:
    """The secret in ``Authorization: Bearer S`` or as the password of HTTP basic auth."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def describe(exc: BaseException) -> str:
    """One log-safe line: never a field's value (pydantic errors quote the input, a password say)."""
    if isinstance(exc, ValidationError):
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        return f"malformed request ({where})"
    if isinstance(exc, TimeoutError):
        return "no decision within request_timeout"
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Guard:
    """Shared secret, bounded concurrency, a deadline and fail-closed answers for every route."""

    def __init__(self, settings: AuthdSettings, metrics: Metrics) -> None:
        secret = settings.shared_secret.get_secret_value() if settings.shared_secret else ""
        self._secret = secret.encode()
        self._max = settings.max_concurrent
        self._timeout = settings.request_timeout
        self._metrics = metrics
        self.in_flight = 0

    def _authorized(self, request: web.Request) -> bool:
        if not self._secret:
            return True
        presented = presented_secret(request)
        return presented is not None and hmac.compare_digest(presented.encode(), self._secret)

    def wrap(self, contract: str, route: Route) -> Handler:
        """The aiohttp handler for ``route``."""

        async def guarded(request: web.Request) -> web.Response:
            started = time.perf_counter()
            if not self._authorized(request):
                self._metrics.unauthorized += 1
                logger.warning("%s %s: caller without the shared secret refused", contract, request.path)
                return web.Response(status=401, text="unauthorized\n")
            if self.in_flight >= self._max:
                self._metrics.overloaded += 1
                return route.deny()
            self.in_flight += 1
            try:
                async with asyncio.timeout(self._timeout):
                    return await route.handle(request)
            except UndecidedError:
                self._metrics.errors[contract] += 1
                return (route.undecided or route.deny)()
            except Exception as exc:  # noqa: BLE001 - every failure must become a "deny"
                self._metrics.errors[contract] += 1
                logger.error("%s %s failed, answered deny: %s", contract, request.path, describe(exc))  # noqa: TRY400 - a traceback could show a password
                return route.deny()
            finally:
                self.in_flight -= 1
                self._metrics.observe(contract, time.perf_counter() - started)

        return guarded


def build_app(
    settings: AuthdSettings,
    contracts: Sequence[Contract],
    metrics: Metrics,
    health: Callable[[], Awaitable[object]],
    scrape: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.Application:
    """The application: each contract's routes, ``GET /healthz`` and ``GET /metrics`` (``scrape``:
    the exposition of ``metrics`` and the rest of the process, which the host renders)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    guard = Guard(settings, metrics)
    for contract in contracts:
        for route in contract.routes:
            app.router.add_post(route.path, guard.wrap(contract.name, route))

    async def healthz(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(settings.request_timeout):
                await health()
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
            logger.error("health check failed: %s", describe(exc))  # noqa: TRY400
            return web.Response(status=503, text="registry unavailable\n")
        return web.Response(text="ok\n")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", scrape)
    return app
