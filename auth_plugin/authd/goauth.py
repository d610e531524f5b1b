"""mosquitto-go-auth's HTTP backend (``auth_opt_backends http``).

Reference: iegomez/mosquitto-go-auth, README "HTTP" and backends/http.go: POST to
``http_getuser_uri`` with ``username``, ``password``, ``clientid``; to ``http_superuser_uri`` with
``username``; to ``http_aclcheck_uri`` with ``username``, ``clientid``, ``topic`` and ``acc`` (1 read,
2 write, 3 read and write, 4 subscribe), as JSON (``http_params_mode json``, the default) or as a
form (``form``). With ``http_response_mode status`` (the default) any 2xx allows; with ``json`` the
body ``{"ok": true}`` does. authd answers both at once: 200 ``{"ok": true, "error": ""}`` or 403
``{"ok": false, "error": "..."}``. Nobody is a superuser. Mosquitto asks for ``acc`` 1 on every
delivery, so here the ACL is checked per message like in the embedded broker.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from auth_plugin.acl import Action
from auth_plugin.authd.app import BadRequestError, Contract, Route
from auth_plugin.authd.service import AuthdService
from auth_plugin.authenticator import ConnectAttempt

NAME = "goauth"
PREFIX = "/goauth"

#: mosquitto's MOSQ_ACL_* access values.
_ACCESS = {
    1: (Action.RECEIVE,),
    2: (Action.PUBLISH,),
    3: (Action.RECEIVE, Action.PUBLISH),
    4: (Action.SUBSCRIBE,),
}


class UserRequest(BaseModel):
    """A login."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    username: str
    password: str = ""
    clientid: str | None = None


class AclRequest(BaseModel):
    """One access check."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    username: str
    clientid: str | None = None
    topic: str
    acc: int


def _answer(*, allowed: bool) -> web.Response:
    if allowed:
        return web.json_response({"ok": True, "error": ""})
    return web.json_response({"ok": False, "error": "not allowed"}, status=403)


def _deny() -> web.Response:
    return _answer(allowed=False)


async def _params(request: web.Request) -> dict[str, Any]:
    if request.content_type == "application/x-www-form-urlencoded":
        posted = await request.post()
        return {key: value for key, value in posted.items() if isinstance(value, str)}
    data = await request.json()
    if not isinstance(data, dict):
        raise BadRequestError("the body must be a JSON object")
    return data


def routes(service: AuthdService) -> Contract:
    """``/goauth/user``, ``/goauth/superuser`` and ``/goauth/acl``."""

    async def user(request: web.Request) -> web.Response:
        form = UserRequest.model_validate(await _params(request))
        principal = await service.login(NAME, ConnectAttempt(form.clientid, form.username, form.password))
        return _answer(allowed=principal is not None)

    async def superuser(request: web.Request) -> web.Response:
        await _params(request)
        return _deny()

    async def acl(request: web.Request) -> web.Response:
        form = AclRequest.model_validate(await _params(request))
        actions = _ACCESS.get(form.acc)
        if actions is None:
            raise BadRequestError(f"unknown acc {form.acc}")
        for action in actions:
            allowed = await service.allowed(
                NAME, username=form.username, client_id=form.clientid, topic=form.topic, action=action
            )
            if not allowed:
                return _deny()
        return _answer(allowed=True)

    return Contract(
        NAME,
        [
            Route(f"{PREFIX}/user", user, _deny),
            Route(f"{PREFIX}/superuser", superuser, _deny),
            Route(f"{PREFIX}/acl", acl, _deny),
        ],
    )
