"""Who may use the console and how its pages defend themselves.

- A session is a random id in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS), checked
  against the registry on every request (:class:`~provisioning.registry.operators.OperatorStore`).
- Every POST carries the session's synchronizer token (``csrf``) and is refused without it; the
  login form, which has no session yet, carries a token that must equal a cookie of its own.
- Every answer but the API's documentation page carries a Content-Security-Policy without inline
  scripts or styles, frame denial, no referrer and no MIME sniffing.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.datastructures import FormData, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.http.console.state import Console, console_of
from provisioning.registry.operators import ABSOLUTE, ConsoleSession

logger = logging.getLogger(__name__)

SESSION_COOKIE = "mqttprov_session"
LOGIN_COOKIE = "mqttprov_login"
CSRF_FIELD = "csrf"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}
#: Swagger UI (``/docs``) loads its script and styles from a CDN and inline: it keeps its own rules.
_OWN_RULES = ("/docs",)


class SecurityHeaders:
    """ASGI middleware: :data:`HEADERS` on every answer outside :data:`_OWN_RULES`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_OWN_RULES):
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, sending)


class LoginRequired(Exception):  # noqa: N818 - an answer (to the login page), not an error
    """The request has no live session: pages go to the login page, fragments answer 401."""


class CsrfRefused(Exception):  # noqa: N818 - an answer (403), not an error
    """A POST without its session's token."""


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path on this site only (never ``//host``), else ``/``."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")):
        return "/"
    return path


async def login_required(request: Request, _exc: Exception) -> Response:
    """Send a page to the login page (and back afterwards); a polled fragment gets 401."""
    if request.query_params.get("fragment"):
        return PlainTextResponse("log in again", status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/login?next={quote(safe_next(target), safe='')}", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def csrf_refused(request: Request, _exc: Exception) -> Response:
    """403: the form was not made by this session (forged, or from before a new login)."""
    logger.warning("console: a POST to %s without its session's token was refused", request.url.path)
    return HTMLResponse(
        "<!doctype html><title>Refused</title><p>This form was refused: it does not carry this "
        'session\'s token. <a href="/">Reload the console</a> and try again.</p>',
        status_code=403,
    )


async def current_session(request: Request) -> ConsoleSession:
    """The request's live session, or :class:`LoginRequired`."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        raise LoginRequired
    session = await console_of(request).operators.session(session_id)
    if session is None:
        raise LoginRequired
    return session


Session = Annotated[ConsoleSession, Depends(current_session)]
ConsoleDep = Annotated[Console, Depends(console_of)]


@dataclass(frozen=True)
class Posted:
    """A POST from a live session, its token checked, and its form fields."""

    session: ConsoleSession
    form: FormData

    def get(self, name: str) -> str:
        """The text field ``name`` (stripped), '' when absent."""
        value = self.form.get(name)
        return value.strip() if isinstance(value, str) else ""

    def all(self, name: str) -> list[str]:
        """Every text value of ``name`` (checkboxes)."""
        return [v.strip() for v in self.form.getlist(name) if isinstance(v, str) and v.strip()]


async def checked_post(request: Request, session: Session) -> Posted:
    """The form of a POST whose ``csrf`` field is this session's token; :class:`CsrfRefused` else."""
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not isinstance(token, str) or not secrets.compare_digest(token.encode(), session.csrf_token.encode()):
        raise CsrfRefused
    return Posted(session, form)


Post = Annotated[Posted, Depends(checked_post)]


def set_session_cookie(response: Response, console: Console, session_id: str) -> None:
    """The session's cookie: HttpOnly, SameSite=Strict, Secure over HTTPS, gone at the latest expiry."""
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(ABSOLUTE.total_seconds()),
        path="/",
        httponly=True,
        samesite="strict",
        secure=console.secure,
    )


def set_login_cookie(response: Response, console: Console, token: str) -> None:
    """The login form's own token, as a cookie its POST must match (no session exists yet)."""
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=console.secure,
    )
