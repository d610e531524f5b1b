"""``[metrics]``: a ``/metrics`` listener for the processes that serve no HTTP of their own.

``mqttprov worker`` and ``mqttprov bridge run`` talk MQTT only; with ``[metrics] port`` set they
answer Prometheus on ``http://host:port/metrics``. aiohttp, already authd's server, runs it in
the process's event loop: the collectors read the live objects on the loop's own thread, never
concurrently with the code that changes them (prometheus-client's ``start_http_server`` would
scrape from a thread of its own).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from broker.errors import ServeError
from config import MetricsSettings

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def metrics_listener(
    settings: MetricsSettings, registry: CollectorRegistry
) -> AsyncIterator[str | None]:
    """Answer ``GET /metrics`` from ``registry`` while inside; yields the URL (None: no ``port``).

    :class:`ServeError` when the port cannot be bound.
    """
    if settings.port is None:
        yield None
        return
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.host, settings.port).start()
        except OSError as exc:
            raise ServeError(
                f"metrics cannot listen on {settings.host}:{settings.port}: {exc} "
                "(set [metrics] port, MQTTPROV_METRICS__PORT)"
            ) from exc
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        url = f"http://{host}:{runner.addresses[0][1]}/metrics"
        logger.info("metrics on %s", url)
        yield url
    finally:
        await runner.cleanup()
