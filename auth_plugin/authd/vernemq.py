"""VerneMQ webhooks (``vmq_webhooks``): auth_on_register, auth_on_subscribe, auth_on_publish.

Reference: https://docs.vernemq.com/plugindevelopment/webhookplugins (vernemq/vmq-docs,
plugindevelopment/webhookplugins.md). VerneMQ POSTs JSON with a ``vernemq-hook`` header and wants
``200`` with ``{"result": "ok"}`` or ``{"result": {"error": ...}}``; a subscription may be answered
per topic, ``qos`` 128 (MQTT 5: 135, "not authorized", under ``modifiers``) marking the refused
ones. The ``_m5`` hooks carry the same fields plus ``properties`` (and ``clean_start``). Mountpoints
are not used by mqttprov: a request with a non-empty mountpoint is refused. Payloads are not
looked at.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from auth_plugin.acl import Action
from auth_plugin.authd.app import Contract, Route
from auth_plugin.authd.service import AuthdService
from auth_plugin.authenticator import ConnectAttempt

NAME = "vernemq"
PREFIX = "/vernemq"
#: SUBACK return code for a refused filter: MQTT 3.1.1 §3.9.3, and MQTT 5's "not authorized".
REFUSED_QOS = 128
REFUSED_QOS_M5 = 135


class _Hook(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    client_id: str
    username: str | None = None
    mountpoint: str = ""


class RegisterHook(_Hook):
    """auth_on_register: a CONNECT."""

    password: str | None = None
    peer_addr: str | None = None
    peer_port: int | None = None
    clean_session: bool | None = None


class SubscribedTopic(BaseModel):
    """One filter of a SUBSCRIBE."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    topic: str
    qos: int


class SubscribeHook(_Hook):
    """auth_on_subscribe: a SUBSCRIBE with one or more filters."""

    topics: list[SubscribedTopic]


class PublishHook(_Hook):
    """auth_on_publish: a PUBLISH from the client."""

    topic: str
    qos: int = 0
    retain: bool = False


def _ok(**extra: object) -> web.Response:
    return web.json_response({"result": "ok", **extra})


def _error(reason: str = "not_allowed") -> web.Response:
    return web.json_response({"result": {"error": reason}})


def routes(service: AuthdService) -> Contract:
    """One endpoint per hook, under ``/vernemq``."""

    async def register(request: web.Request) -> web.Response:
        hook = RegisterHook.model_validate(await request.json())
        if hook.mountpoint:
            return _error()
        attempt = ConnectAttempt(hook.client_id, hook.username, hook.password, address=hook.peer_addr)
        principal = await service.login(NAME, attempt)
        return _ok() if principal is not None else _error()

    async def granted(hook: SubscribeHook, refused_qos: int) -> list[dict[str, object]] | None:
        """Each filter with its granted or refused QoS; None when the hook is refused as a whole."""
        if hook.mountpoint or not hook.topics:
            return None
        answer: list[dict[str, object]] = []
        for item in hook.topics:
            allowed = await service.allowed(
                NAME,
                username=hook.username,
                client_id=hook.client_id,
                topic=item.topic,
                action=Action.SUBSCRIBE,
            )
            answer.append({"topic": item.topic, "qos": item.qos if allowed else refused_qos})
        return None if all(entry["qos"] == refused_qos for entry in answer) else answer

    async def subscribe(request: web.Request) -> web.Response:
        topics = await granted(SubscribeHook.model_validate(await request.json()), REFUSED_QOS)
        return _error() if topics is None else _ok(topics=topics)

    async def subscribe_m5(request: web.Request) -> web.Response:
        topics = await granted(SubscribeHook.model_validate(await request.json()), REFUSED_QOS_M5)
        return _error() if topics is None else _ok(modifiers={"topics": topics})

    async def publish(request: web.Request) -> web.Response:
        hook = PublishHook.model_validate(await request.json())
        if hook.mountpoint:
            return _error()
        allowed = await service.allowed(
            NAME, username=hook.username, client_id=hook.client_id, topic=hook.topic, action=Action.PUBLISH
        )
        return _ok() if allowed else _error()

    return Contract(
        NAME,
        [
            Route(f"{PREFIX}/auth_on_register", register, _error),
            Route(f"{PREFIX}/auth_on_subscribe", subscribe, _error),
            Route(f"{PREFIX}/auth_on_publish", publish, _error),
            # MQTT 5 sessions: the same decisions (the bodies add properties and clean_start).
            Route(f"{PREFIX}/auth_on_register_m5", register, _error),
            Route(f"{PREFIX}/auth_on_subscribe_m5", subscribe_m5, _error),
            Route(f"{PREFIX}/auth_on_publish_m5", publish, _error),
        ],
    )
