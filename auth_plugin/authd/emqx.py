"""EMQX 5 HTTP authentication and HTTP authorization.

References: https://docs.emqx.com/en/emqx/latest/access-control/authn/http.html and
https://docs.emqx.com/en/emqx/latest/access-control/authz/http.html. EMQX sends a JSON body built
from the template in its configuration (docs/scaling-out.md gives the one authd expects) and wants
``200`` with ``{"result": "allow" | "deny" | "ignore"}``, plus ``is_superuser`` for a login.
authd never makes a superuser. Errors are answered ``200 {"result": "deny"}`` (a 4xx/5xx would
mean "ignore" to EMQX).

A login authd cannot decide now (the registry is unavailable, or no decision in time) is answered
``ignore``: "not decided", never a verdict on the password. EMQX then asks the next authenticator
of its chain, and refuses the client (``not_authorized``) when none is left, so ``ignore`` grants
nothing by itself; EMQX counts it as ``nomatch``, not ``failed``. A topic check is never answered
``ignore``: past the last authorizer EMQX applies ``authorization.no_match``, which defaults to
``allow``.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from auth_plugin.acl import Action
from auth_plugin.authd.app import Contract, Route
from auth_plugin.authd.service import AuthdService
from auth_plugin.authenticator import ConnectAttempt

NAME = "emqx"
PREFIX = "/emqx"


class AuthnRequest(BaseModel):
    """Body template: ``{"clientid": "${clientid}", "username": "${username}", "password": "${password}",
    "peerhost": "${peerhost}"}``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    clientid: str
    username: str | None = None
    password: str | None = None
    peerhost: str | None = None


class AuthzRequest(BaseModel):
    """Body template: ``{"clientid": "${clientid}", "username": "${username}", "topic": "${topic}",
    "action": "${action}"}``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    clientid: str
    username: str | None = None
    topic: str
    action: Literal["publish", "subscribe"]


def _authn(*, allowed: bool) -> web.Response:
    return web.json_response({"result": "allow" if allowed else "deny", "is_superuser": False})


def _authn_ignore() -> web.Response:
    return web.json_response({"result": "ignore"})


def _authz(*, allowed: bool) -> web.Response:
    return web.json_response({"result": "allow" if allowed else "deny"})


def routes(service: AuthdService) -> Contract:
    """``POST /emqx/authn`` and ``POST /emqx/authz``."""

    async def authn(request: web.Request) -> web.Response:
        body = AuthnRequest.model_validate(await request.json())
        attempt = ConnectAttempt(body.clientid, body.username, body.password, address=body.peerhost)
        principal = await service.login(NAME, attempt)
        return _authn(allowed=principal is not None)

    async def authz(request: web.Request) -> web.Response:
        body = AuthzRequest.model_validate(await request.json())
        action = Action.PUBLISH if body.action == "publish" else Action.SUBSCRIBE
        allowed = await service.allowed(
            NAME, username=body.username, client_id=body.clientid, topic=body.topic, action=action
        )
        return _authz(allowed=allowed)

    return Contract(
        NAME,
        [
            Route(f"{PREFIX}/authn", authn, lambda: _authn(allowed=False), _authn_ignore),
            Route(f"{PREFIX}/authz", authz, lambda: _authz(allowed=False)),
        ],
    )
