"""``/login`` and ``/logout``: operators' passwords, throttled as MQTT logins are.

Failures are counted per name, per address and per pair (``auth_plugin.throttle``): past
``[auth] throttle_after`` refusals slow down, past ``lockout_after`` the pair is refused without
a check for ``lockout_seconds``. A name that does not exist is checked against a decoy hash, so
that it takes as long as a wrong password.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from broker.http.console.render import page
from broker.http.console.security import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    ConsoleDep,
    CsrfRefused,
    Post,
    safe_next,
    set_login_cookie,
    set_session_cookie,
)

logger = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

NextQuery = Annotated[str | None, Query(alias="next", max_length=512)]


@router.get("/login")
async def login_page(request: Request, console: ConsoleDep, next_path: NextQuery = None) -> Response:
    """The login form, with a fresh token that its POST must carry (and its cookie match)."""
    return _form(request, console, next_path)


def _form(
    request: Request,
    console: ConsoleDep,
    next_path: str | None,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    token = secrets.token_urlsafe(32)
    response = page(
        request,
        "login.html",
        None,
        status=status,
        error=error,
        login_token=token,
        next_path=safe_next(next_path),
    )
    set_login_cookie(response, console, token)
    return response


@router.post("/login")
async def login(request: Request, console: ConsoleDep) -> Response:
    """Check the password; a session and its cookie on success, the form again otherwise."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    token, cookie = fields.get(CSRF_FIELD, ""), request.cookies.get(LOGIN_COOKIE, "")
    if not token or not secrets.compare_digest(token.encode(), cookie.encode()):
        raise CsrfRefused
    name, password = fields.get("name", "").strip(), fields.get("password", "")
    next_path = fields.get("next")
    address = request.client.host if request.client else None
    throttle = console.throttle
    if throttle.locked(name, address) or not throttle.begin_check(name, address):
        logger.warning("console login locked out name=%r address=%s", name, address)
        return _form(
            request, console, next_path, error="Too many failed logins: try again later.", status=429
        )
    try:
        found = await console.operators.find_login(name)
        hashed = found.password_hash if found is not None else await console.decoy_hash()
        verified = await console.services.hasher.verify(password, hashed) and found is not None
    finally:
        throttle.end_check(name, address)
    if not verified or found is None:
        delay = throttle.failed(name, address)
        logger.info("console login refused name=%r address=%s", name, address)
        if delay:
            await asyncio.sleep(delay)
        return _form(request, console, next_path, error="Wrong name or password.", status=401)
    throttle.succeeded(name, address)
    started = await console.operators.start_session(found.operator)
    response = RedirectResponse(safe_next(next_path), status_code=303)
    set_session_cookie(response, console, started.session_id)
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(request: Request, console: ConsoleDep, posted: Post) -> Response:
    """End the session everywhere (its row is deleted) and forget the cookie."""
    await console.operators.end_session(request.cookies.get(SESSION_COOKIE, ""))
    logger.info("console logout operator=%s", posted.session.operator.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
