"""The console on the API's FastAPI app: its routes under ``/``, its static files, its answers."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from broker.http.api.context import ApiServices
from broker.http.console import accounts, approvals, devices, login, overview, tokens
from broker.http.console.security import (
    CsrfRefused,
    LoginRequired,
    SecurityHeaders,
    csrf_refused,
    login_required,
)
from broker.http.console.state import HERE, Console
from provisioning.registry.operators import OperatorStore

logger = logging.getLogger(__name__)

#: Where the console's script and style sheet are served from.
STATIC = "/static"


def install_console(app: FastAPI, services: ApiServices) -> None:
    """Add the console's pages to ``app`` (the API's), on the same ``services``."""
    app.state.console = Console.build(services)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(CsrfRefused, csrf_refused)
    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="console-static")
    for module in (login, overview, devices, approvals, accounts, tokens):
        app.include_router(module.router)


async def announce_console(url: str, services: ApiServices) -> None:
    """Log where the console is, and how to create the first operator when there is none."""
    if not services.settings.api.console:
        return
    operators = await OperatorStore(services.registry.engine).list_operators()
    logger.info("console at %s/ (%d operators)", url, len(operators))
    if not operators:
        logger.info("console: no operator yet; create the first with: mqttprov operators add NAME")
