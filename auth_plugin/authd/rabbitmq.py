"""RabbitMQ's HTTP auth backend (``rabbitmq_auth_backend_http``), as RabbitMQ 3.10 calls it for MQTT.

Reference: https://github.com/rabbitmq/rabbitmq-server/blob/main/deps/rabbitmq_auth_backend_http/README.md
(form-encoded POST with ``auth_http.http_method = post``; the answer is the body ``allow`` or
``deny``). What RabbitMQ 3.10.8 sends for an MQTT session was recorded against a real node (see
tests/test_authd_contracts.py). MQTT topics arrive as AMQP routing keys: ``/`` becomes ``.``,
``+`` becomes ``*``, and a ``.`` inside a topic level stays a ``.`` -- so in RabbitMQ
``a/b`` and ``a.b`` are the same topic, and we read every ``.`` as a level separator.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from auth_plugin.acl import Action
from auth_plugin.authd.app import Contract, Route
from auth_plugin.authd.service import AuthdService
from auth_plugin.authenticator import ConnectAttempt
from provisioning.contract import REPLY_PREFIX

NAME = "rabbitmq"
PREFIX = "/rabbitmq"
#: The exchange the MQTT plugin publishes to and binds subscription queues on.
MQTT_EXCHANGE = "amq.topic"
_RK_REPLY_PREFIX = REPLY_PREFIX.replace("/", ".")


class _Form(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    username: str
    vhost: str = "/"


class UserRequest(_Form):
    """``user_path``: a login."""

    password: str = ""
    client_id: str | None = None


class VhostRequest(_Form):
    """``vhost_path``: may the user use this virtual host."""

    client_id: str | None = None
    ip: str | None = None


class ResourceRequest(_Form):
    """``resource_path``: a queue or exchange operation."""

    resource: Literal["queue", "exchange", "topic"]
    name: str
    permission: Literal["configure", "write", "read"]
    client_id: str | None = None


class TopicRequest(_Form):
    """``topic_path``: a publish (``write``) or a subscription binding (``read``)."""

    resource: Literal["topic"]
    name: str
    permission: Literal["write", "read"]
    routing_key: str
    client_id: str | None = Field(None, alias="variable_map.client_id")


def topic_of(routing_key: str) -> str:
    """The MQTT topic (or filter) a routing key stands for.

    ``provision.reply.<rest>`` keeps ``<rest>`` whole: a MAC written ``aabb.ccdd.eeff`` is one
    level of the reply topic, not three.
    """
    if routing_key.startswith(_RK_REPLY_PREFIX):
        return REPLY_PREFIX + routing_key[len(_RK_REPLY_PREFIX) :].replace("*", "+")
    return routing_key.replace(".", "/").replace("*", "+")


def _answer(*, allowed: bool) -> web.Response:
    return web.Response(text="allow" if allowed else "deny", content_type="text/plain")


def _deny() -> web.Response:
    return _answer(allowed=False)


async def _form(request: web.Request) -> dict[str, str]:
    posted = await request.post()
    return {key: value for key, value in posted.items() if isinstance(value, str)}


def routes(service: AuthdService, *, vhost: str = "/") -> Contract:
    """The four endpoints, under ``/rabbitmq``."""

    async def user(request: web.Request) -> web.Response:
        form = UserRequest.model_validate(await _form(request))
        if form.vhost != vhost:
            return _deny()
        # RabbitMQ does not send the client's address with a login (only with the vhost check).
        principal = await service.login(NAME, ConnectAttempt(form.client_id, form.username, form.password))
        return _answer(allowed=principal is not None)

    async def vhost_access(request: web.Request) -> web.Response:
        form = VhostRequest.model_validate(await _form(request))
        principal = await service.principal(form.username, form.client_id)
        allowed = principal is not None and form.vhost == vhost
        service.metrics.check(NAME, allowed=allowed)
        return _answer(allowed=allowed)

    async def resource(request: web.Request) -> web.Response:
        form = ResourceRequest.model_validate(await _form(request))
        principal = await service.principal(form.username, form.client_id)
        allowed = principal is not None and form.vhost == vhost and _own_resource(form)
        service.metrics.check(NAME, allowed=allowed)
        return _answer(allowed=allowed)

    async def topic(request: web.Request) -> web.Response:
        form = TopicRequest.model_validate(await _form(request))
        if form.vhost != vhost or form.name != MQTT_EXCHANGE:
            service.metrics.check(NAME, allowed=False)
            return _deny()
        action = Action.PUBLISH if form.permission == "write" else Action.SUBSCRIBE
        allowed = await service.allowed(
            NAME,
            username=form.username,
            client_id=form.client_id,
            topic=topic_of(form.routing_key),
            action=action,
        )
        return _answer(allowed=allowed)

    return Contract(
        NAME,
        [
            Route(f"{PREFIX}/user", user, _deny),
            Route(f"{PREFIX}/vhost", vhost_access, _deny),
            Route(f"{PREFIX}/resource", resource, _deny),
            Route(f"{PREFIX}/topic", topic, _deny),
        ],
    )


def _own_resource(form: ResourceRequest) -> bool:
    """The MQTT plugin's own objects for this client: amq.topic, and its subscription queues."""
    if form.resource == "exchange":
        return form.name == MQTT_EXCHANGE and form.permission in ("read", "write")
    if form.resource == "queue" and form.client_id:
        # rabbitmq_mqtt 3.10 names them mqtt-subscription-<client id>qos0 / qos1.
        return form.name in (f"mqtt-subscription-{form.client_id}qos{qos}" for qos in (0, 1))
    return False
