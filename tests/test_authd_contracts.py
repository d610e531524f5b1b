"""mqttprov authd's four contracts, with the request shapes each broker documents (or, for RabbitMQ,
sends: recorded from RabbitMQ 3.10.8 with rabbitmq_mqtt), and the fail-closed guard around them.

Shapes and sources:
- RabbitMQ HTTP auth backend: https://github.com/rabbitmq/rabbitmq-server/blob/main/deps/rabbitmq_auth_backend_http/README.md
  (form fields as recorded from a real node, see :meth:`tests.authd_support.AuthdClient.rabbit_topic`);
- EMQX 5: https://docs.emqx.com/en/emqx/latest/access-control/authn/http.html and
  https://docs.emqx.com/en/emqx/latest/access-control/authz/http.html (JSON body from the template in
  docs/scaling-out.md; answers ``{"result": ...}`` with ``is_superuser``);
- VerneMQ: https://docs.vernemq.com/plugindevelopment/webhookplugins (the example payloads);
- mosquitto-go-auth: https://github.com/iegomez/mosquitto-go-auth (README "HTTP", backends/http.go).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from auth_plugin.acl import Action
from auth_plugin.authd.policy import REPLY_TOPICS, external_allows, overlaps, unshared
from auth_plugin.authenticator import Authenticator
from auth_plugin.principals import AccountPrincipal
from broker.http.authd import AuthdServer
from provisioning.registry import DeviceInfo, DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from tests.auth_support import ACCOUNT_PASSWORD, PASSWORD, make_account, make_device
from tests.authd_support import (
    REVOCATION_DEADLINE,
    SECRET,
    AuthdClient,
    authd_settings,
    basic,
    client_for,
    migrate,
    running_authd,
)
from tests.helpers import free_port
from tests.metrics_support import Scrape

MAC = "02:00:00:00:08:01"
OTHER_MAC = "02:00:00:00:08:02"


class Fleet:
    """One device and one service account in the test's registry, and the running authd."""

    def __init__(
        self, server: AuthdServer, client: AuthdClient, device: DeviceInfo, other: DeviceInfo
    ) -> None:
        self.server = server
        self.client = client
        self.device = device
        self.other = other

    @property
    def user(self) -> str:
        return self.device.mqtt_username

    @property
    def namespace(self) -> str:
        return f"devices/{self.device.id}"


@pytest.fixture
async def fleet(sqlite_url: str) -> AsyncIterator[Fleet]:
    await migrate(sqlite_url)
    registry = DeviceRegistry(create_engine(sqlite_url))
    try:
        device = await make_device(registry, MAC)
        other = await make_device(registry, OTHER_MAC)
        await make_account(
            AccountRegistry(registry.engine),
            "backend",
            ["subscribe devices/+/telemetry", "publish devices/+/commands", "subscribe #"],
        )
    finally:
        await registry.close()
    async with running_authd(authd_settings(sqlite_url)) as (server, client):
        yield Fleet(server, client, device, other)


# -- RabbitMQ -------------------------------------------------------------------------------------


async def test_rabbitmq_device_login_vhost_resources_and_topics(fleet: Fleet) -> None:
    c, user = fleet.client, fleet.user
    assert await c.rabbit_user(user, PASSWORD, user) == "allow"
    assert await c.rabbit_user(user, "wrong-password", user) == "deny"
    assert await c.rabbit_user(user, PASSWORD, "someone-else") == "deny"  # client id = username
    vhost = {"username": user, "vhost": "/", "ip": "127.0.0.1", "tags": "", "client_id": user}
    assert (await c.form("/rabbitmq/vhost", vhost)).text == "allow"
    assert (await c.form("/rabbitmq/vhost", vhost | {"vhost": "other"})).text == "deny"

    def resource(kind: str, name: str, permission: str) -> dict[str, str]:
        return {
            "username": user,
            "vhost": "/",
            "resource": kind,
            "name": name,
            "permission": permission,
            "tags": "",
            "client_id": user,
        }

    for permission in ("configure", "read", "write"):
        own_queue = resource("queue", f"mqtt-subscription-{user}qos1", permission)
        assert (await c.form("/rabbitmq/resource", own_queue)).text == "allow"
        other_queue = resource("queue", f"mqtt-subscription-{fleet.other.mqtt_username}qos1", permission)
        assert (await c.form("/rabbitmq/resource", other_queue)).text == "deny"
    assert (await c.form("/rabbitmq/resource", resource("exchange", "amq.topic", "write"))).text == "allow"
    assert (await c.form("/rabbitmq/resource", resource("exchange", "amq.direct", "write"))).text == "deny"

    own = f"devices.{fleet.device.id}"
    assert await c.rabbit_topic(user, user, "write", f"{own}.telemetry") == "allow"
    assert await c.rabbit_topic(user, user, "read", f"{own}.#") == "allow"
    assert await c.rabbit_topic(user, user, "read", f"{own}.*.state") == "allow"
    assert await c.rabbit_topic(user, user, "write", f"devices.{fleet.other.id}.telemetry") == "deny"
    assert await c.rabbit_topic(user, user, "read", "devices.#") == "deny"
    assert await c.rabbit_topic(user, user, "write", "provision.request") == "deny"


async def test_rabbitmq_provisioning_sessions_reach_only_their_own_reply_topic(fleet: Fleet) -> None:
    c = fleet.client
    # RabbitMQ 3.10 keeps ':' as it is in the routing key; '.' of the dotted MAC notation stays too.
    for client_id, key in (
        ("aa:bb:cc:dd:ee:01", "provision.reply.aa:bb:cc:dd:ee:01"),
        ("aabb.ccdd.ee02", "provision.reply.aabb.ccdd.ee02"),
        ("AA-BB-CC-DD-EE-03-boot7", "provision.reply.AA-BB-CC-DD-EE-03"),
    ):
        # Anonymous MQTT logins reach authd as mqtt.default_user (docs/scaling-out.md: "provision").
        assert await c.rabbit_user("provision", "provision", client_id) == "allow"
        assert await c.rabbit_topic("provision", client_id, "read", key) == "allow"
        assert await c.rabbit_topic("provision", client_id, "write", "provision.request") == "allow"
        assert (
            await c.rabbit_topic("provision", client_id, "read", "provision.reply.aa:bb:cc:dd:ee:99")
            == "deny"
        )
        assert await c.rabbit_topic("provision", client_id, "read", "provision.reply.*") == "deny"
        assert await c.rabbit_topic("provision", client_id, "read", "provision.reply.#") == "deny"
        assert await c.rabbit_topic("provision", client_id, "write", key) == "deny"
    assert await c.rabbit_user("provision", "provision", "not-a-mac") == "deny"


async def test_service_accounts_never_subscribe_over_provisioning_replies(fleet: Fleet) -> None:
    c = fleet.client
    assert await c.rabbit_user("backend", ACCOUNT_PASSWORD, "backend-1") == "allow"
    assert await c.rabbit_topic("backend", "backend-1", "read", "devices.*.telemetry") == "allow"
    assert await c.rabbit_topic("backend", "backend-1", "write", "devices.x.commands") == "allow"
    # The account's rules say "subscribe #", yet nothing that reaches provision/reply/ is allowed:
    # RabbitMQ checks a binding once, never each delivery.
    for key in ("#", "provision.#", "*.reply.#", "provision.reply.*", "provision.*.aa:bb:cc:dd:ee:ff"):
        assert await c.rabbit_topic("backend", "backend-1", "read", key) == "deny", key
    emqx = {"clientid": "backend-1", "username": "backend", "action": "subscribe"}
    assert (await c.json("/emqx/authz", emqx | {"topic": "#"})).json() == {"result": "deny"}
    assert (await c.json("/emqx/authz", emqx | {"topic": "+/reply/+"})).json() == {"result": "deny"}
    verne = {"client_id": "backend-1", "mountpoint": "", "username": "backend"}
    answer = await c.json("/vernemq/auth_on_subscribe", verne | {"topics": [{"topic": "#", "qos": 1}]})
    assert answer.json() == {"result": {"error": "not_allowed"}}
    acl = {"username": "backend", "clientid": "backend-1", "topic": "provision/#", "acc": 4}
    assert (await c.json("/goauth/acl", acl)).status == 403


def test_reply_overlap_is_decided_on_filters() -> None:
    for overlapping in ("#", "+/#", "provision/#", "+/reply/x", "provision/+/+", "provision/reply/+"):
        assert overlaps(overlapping, REPLY_TOPICS), overlapping
    for apart in ("devices/#", "provision/request", "provision/reply", "+", "+/+", "provision/x/y", "a/+/+"):
        assert not overlaps(apart, REPLY_TOPICS), apart
    assert overlaps("+/+", "provision/request")
    assert overlaps("provision/request", "provision/request/#")  # '#' matches its parent level
    assert not overlaps("provision/request/x", "provision/request")
    assert unshared("$share/workers/provision/request") == "provision/request"
    account = AccountPrincipal("a", subscribe=("#",), publish=("#",), tag="t")
    assert external_allows(account, "devices/1/telemetry", Action.SUBSCRIBE)
    for refused in ("#", "+/+", "provision/request", "$share/g/provision/request", "devices/#/x"):
        assert not external_allows(account, refused, Action.SUBSCRIBE), refused
    assert not external_allows(account, f"provision/reply/{MAC}", Action.PUBLISH)
    assert not external_allows(account, "provision/request", Action.RECEIVE)
    worker = AccountPrincipal(
        "worker", subscribe=("provision/request",), publish=("provision/reply/+",), tag="t"
    )
    assert external_allows(worker, "provision/request", Action.SUBSCRIBE)
    assert external_allows(worker, "$share/mqttprov/provision/request", Action.SUBSCRIBE)
    assert external_allows(worker, "provision/request", Action.RECEIVE)
    assert external_allows(worker, f"provision/reply/{MAC}", Action.PUBLISH)
    assert not external_allows(worker, "provision/reply/not-a-mac", Action.PUBLISH)
    assert not external_allows(worker, "provision/+", Action.SUBSCRIBE)
    assert not external_allows(worker, f"provision/reply/{MAC}", Action.SUBSCRIBE)
    assert not external_allows(worker, f"provision/reply/{MAC}", Action.RECEIVE)
    assert not external_allows(worker, "provision/request", Action.PUBLISH)


# -- EMQX -----------------------------------------------------------------------------------------


async def test_emqx_authentication_and_authorization(fleet: Fleet) -> None:
    c, user = fleet.client, fleet.user
    login = {"clientid": user, "username": user, "password": PASSWORD, "peerhost": "127.0.0.1"}
    answer = await c.json("/emqx/authn", login)
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert answer.json() == {"result": "allow", "is_superuser": False}
    assert (await c.json("/emqx/authn", login | {"password": "nope"})).json() == {
        "result": "deny",
        "is_superuser": False,
    }
    # Anonymous: EMQX renders an absent username as an empty string.
    provisioning = {"clientid": MAC, "username": "", "password": "", "peerhost": "127.0.0.1"}
    assert (await c.json("/emqx/authn", provisioning)).json()["result"] == "allow"

    def authz(topic: str, action: str, clientid: str = user, username: str = user) -> dict[str, str]:
        return {"clientid": clientid, "username": username, "topic": topic, "action": action}

    for body, result in (
        (authz(f"{fleet.namespace}/telemetry", "publish"), "allow"),
        (authz(f"{fleet.namespace}/#", "subscribe"), "allow"),
        (authz(f"devices/{fleet.other.id}/telemetry", "publish"), "deny"),
        (authz("devices/#", "subscribe"), "deny"),
        (authz(f"provision/reply/{MAC}", "subscribe", MAC, ""), "allow"),
        (authz(f"provision/reply/{OTHER_MAC}", "subscribe", MAC, ""), "deny"),
        (authz("provision/request", "publish", MAC, ""), "allow"),
    ):
        assert (await c.json("/emqx/authz", body)).json() == {"result": result}, body


# -- VerneMQ --------------------------------------------------------------------------------------


async def test_vernemq_webhooks(fleet: Fleet) -> None:
    c, user = fleet.client, fleet.user
    hook = {"vernemq-hook": "auth_on_register"}
    register = {
        "peer_addr": "127.0.0.1",
        "peer_port": 8888,
        "username": user,
        "password": PASSWORD,
        "mountpoint": "",
        "client_id": user,
        "clean_session": False,
    }
    assert (await c.json("/vernemq/auth_on_register", register, **hook)).json() == {"result": "ok"}
    refused = {"result": {"error": "not_allowed"}}
    assert (await c.json("/vernemq/auth_on_register", register | {"password": "x"}, **hook)).json() == refused
    assert (
        await c.json("/vernemq/auth_on_register", register | {"mountpoint": "m"}, **hook)
    ).json() == refused
    anonymous = register | {"username": None, "password": None, "client_id": MAC}
    assert (await c.json("/vernemq/auth_on_register", anonymous, **hook)).json() == {"result": "ok"}

    subscribe = {
        "client_id": user,
        "mountpoint": "",
        "username": user,
        "topics": [{"topic": f"{fleet.namespace}/#", "qos": 1}, {"topic": "devices/+/telemetry", "qos": 2}],
    }
    answer = await c.json("/vernemq/auth_on_subscribe", subscribe, **{"vernemq-hook": "auth_on_subscribe"})
    assert answer.json() == {
        "result": "ok",
        "topics": [{"topic": f"{fleet.namespace}/#", "qos": 1}, {"topic": "devices/+/telemetry", "qos": 128}],
    }
    publish = {
        "username": user,
        "client_id": user,
        "mountpoint": "",
        "qos": 1,
        "topic": f"{fleet.namespace}/telemetry",
        "payload": "aGVsbG8=",
        "retain": False,
    }
    header = {"vernemq-hook": "auth_on_publish"}
    assert (await c.json("/vernemq/auth_on_publish", publish, **header)).json() == {"result": "ok"}
    elsewhere = publish | {"topic": f"devices/{fleet.other.id}/telemetry"}
    assert (await c.json("/vernemq/auth_on_publish", elsewhere, **header)).json() == refused


async def test_vernemq_mqtt5_webhooks(fleet: Fleet) -> None:
    c, user = fleet.client, fleet.user
    register = {
        "peer_addr": "127.0.0.1",
        "peer_port": 8888,
        "mountpoint": "",
        "client_id": user,
        "username": user,
        "password": PASSWORD,
        "clean_start": True,
        "properties": {},
    }
    hook = {"vernemq-hook": "auth_on_register_m5"}
    assert (await c.json("/vernemq/auth_on_register_m5", register, **hook)).json() == {"result": "ok"}
    wrong = register | {"password": "wrong"}
    answer = await c.json("/vernemq/auth_on_register_m5", wrong, **hook)
    assert answer.json() == {"result": {"error": "not_allowed"}}
    subscribe = {
        "username": user,
        "mountpoint": "",
        "client_id": user,
        "topics": [{"topic": f"{fleet.namespace}/#", "qos": 1}, {"topic": "#", "qos": 1}],
        "properties": {},
    }
    answer = await c.json(
        "/vernemq/auth_on_subscribe_m5", subscribe, **{"vernemq-hook": "auth_on_subscribe_m5"}
    )
    assert answer.json() == {
        "result": "ok",
        "modifiers": {"topics": [{"topic": f"{fleet.namespace}/#", "qos": 1}, {"topic": "#", "qos": 135}]},
    }
    publish = {
        "username": user,
        "mountpoint": "",
        "client_id": user,
        "qos": 1,
        "topic": f"devices/{fleet.other.id}/telemetry",
        "payload": "bWVzc2FnZQ==",
        "retain": False,
        "properties": {},
    }
    answer = await c.json("/vernemq/auth_on_publish_m5", publish, **{"vernemq-hook": "auth_on_publish_m5"})
    assert answer.json() == {"result": {"error": "not_allowed"}}


# -- mosquitto-go-auth ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["json", "form"])
async def test_mosquitto_go_auth_http_backend(fleet: Fleet, mode: str) -> None:
    c, user = fleet.client, fleet.user

    async def post(path: str, body: dict[str, Any]) -> int:
        if mode == "form":
            answer = await c.form(path, {k: str(v) for k, v in body.items()})
        else:
            answer = await c.json(path, body)
        # Both response modes at once: the status, and {"ok": ...} for http_response_mode json.
        assert answer.json()["ok"] is (answer.status == 200)
        return answer.status

    assert await post("/goauth/user", {"username": user, "password": PASSWORD, "clientid": user}) == 200
    assert await post("/goauth/user", {"username": user, "password": "no", "clientid": user}) == 403
    assert await post("/goauth/superuser", {"username": user}) == 403
    own, other = f"{fleet.namespace}/telemetry", f"devices/{fleet.other.id}/telemetry"
    for topic, acc, status in (
        (own, 1, 200),
        (own, 2, 200),
        (own, 3, 200),
        (f"{fleet.namespace}/#", 4, 200),
        (other, 1, 403),  # Mosquitto asks on every delivery: per-message ACL
        (other, 2, 403),
        ("devices/#", 4, 403),
        (own, 9, 403),  # unknown access value
    ):
        check = {"username": user, "clientid": user, "topic": topic, "acc": acc}
        assert await post("/goauth/acl", check) == status
    # A provisioning session (username "provision") gets its reply through its subscription, and
    # Mosquitto asks about that delivery: its own reply topic is readable, nothing else is.
    assert await post("/goauth/user", {"username": "provision", "password": "x", "clientid": MAC}) == 200
    for topic, acc, status in (
        (f"provision/reply/{MAC}", 4, 200),
        (f"provision/reply/{MAC}", 1, 200),
        (f"provision/reply/{MAC.upper()}", 1, 200),
        (f"provision/reply/{OTHER_MAC}", 1, 403),
        ("provision/request", 2, 200),
        ("provision/request", 1, 403),
    ):
        check = {"username": "provision", "clientid": MAC, "topic": topic, "acc": acc}
        assert await post("/goauth/acl", check) == status, (topic, acc)
    reply_to_device = {"username": user, "clientid": user, "topic": f"provision/reply/{MAC}", "acc": 1}
    assert await post("/goauth/acl", reply_to_device) == 403


# -- the guard: shared secret, malformed bodies, database down, overload, timeout -------------------


ROUTES = [
    ("/rabbitmq/user", "deny"),
    ("/rabbitmq/vhost", "deny"),
    ("/rabbitmq/resource", "deny"),
    ("/rabbitmq/topic", "deny"),
    ("/emqx/authn", '{"result": "deny", "is_superuser": false}'),
    ("/emqx/authz", '{"result": "deny"}'),
    ("/vernemq/auth_on_register", '{"result": {"error": "not_allowed"}}'),
    ("/vernemq/auth_on_subscribe", '{"result": {"error": "not_allowed"}}'),
    ("/vernemq/auth_on_publish", '{"result": {"error": "not_allowed"}}'),
    ("/goauth/user", '{"ok": false, "error": "not allowed"}'),
    ("/goauth/acl", '{"ok": false, "error": "not allowed"}'),
]


async def test_callers_without_the_shared_secret_are_refused(fleet: Fleet) -> None:
    user = fleet.user
    login = {"username": user, "password": PASSWORD, "vhost": "/", "client_id": user}
    for authorization in (None, "Bearer wrong", basic("wrong"), "Basic !!!", f"Token {SECRET}"):
        async with client_for(fleet.server.url, authorization or "") as stranger:
            for path, _ in ROUTES:
                assert (await stranger.form(path, login)).status == 401, (authorization, path)
    # Both ways a broker can present it: a Bearer header, or user:secret@ in the URL (basic auth).
    for authorization in (f"Bearer {SECRET}", basic()):
        async with client_for(fleet.server.url, authorization) as broker:
            assert (await broker.form("/rabbitmq/user", login)).text == "allow"
    metrics = Scrape((await fleet.client.get("/metrics")).text)
    assert metrics["mqttprov_authd_unauthorized_total"] == 55


async def test_malformed_requests_are_denied_and_logged_without_the_password(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="auth_plugin.authd")
    secret_password = "pw-that-must-not-be-logged-9"
    for path, deny in ROUTES:
        for content_type, body in (
            ("application/json", b"{not json"),
            ("application/json", b'["a", "list"]'),
            ("application/json", b'{"password": 5, "pw": "' + secret_password.encode() + b'"}'),
            ("application/x-www-form-urlencoded", b"password=" + secret_password.encode()),
        ):
            answer = await fleet.client.raw(path, body, content_type)
            expected_status = 403 if path.startswith("/goauth") else 200
            assert (answer.status, _normal(answer.text)) == (expected_status, _normal(deny)), (path, body)
    assert len(caplog.records) == 4 * len(ROUTES)
    assert all(record.levelno == logging.ERROR for record in caplog.records)
    assert secret_password not in caplog.text
    assert "answered deny: malformed request" in caplog.text


def _normal(text: str) -> str:
    return text.replace(" ", "")


async def test_database_unreachable_denies_everything_and_fails_health(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/mqttprov"
    caplog.set_level(logging.WARNING)
    async with running_authd(authd_settings(nowhere)) as (_, c):
        assert await c.rabbit_user("device_0123456789ab", PASSWORD, "device_0123456789ab") == "deny"
        assert await c.rabbit_topic("backend", "backend", "read", "devices.*.telemetry") == "deny"
        login = {"clientid": "backend", "username": "backend", "password": PASSWORD}
        assert (await c.json("/emqx/authn", login)).json()["result"] == "ignore"  # not decided
        assert (await c.json("/goauth/user", login | {"clientid": "backend"})).status == 403
        health = await c.get("/healthz")
        assert health.status == 503
        metrics = Scrape((await c.get("/metrics")).text)
    assert metrics.value("mqttprov_authd_errors_total", contract="rabbitmq") == 2
    # Told once for the outage (tests/test_db_faults_authd.py), not once per request.
    assert caplog.text.count("database unavailable (") == 1
    assert "answered deny" not in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.slow
async def test_over_max_concurrent_or_past_the_deadline_is_a_deny(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(sqlite_url)
    entered, release = asyncio.Event(), asyncio.Event()
    original = Authenticator.authenticate

    async def stuck(self: Authenticator, attempt: Any) -> Any:  # fault: a check that hangs
        if attempt.username == "stuck":
            entered.set()
            await release.wait()
        return await original(self, attempt)

    monkeypatch.setattr(Authenticator, "authenticate", stuck)
    settings = authd_settings(sqlite_url, max_concurrent=1, request_timeout=1.0)
    async with running_authd(settings) as (_, c):
        hanging = asyncio.create_task(c.rabbit_user("stuck", "pw", "stuck"))
        await asyncio.wait_for(entered.wait(), 10)
        assert await c.rabbit_user("other", "pw", "other") == "deny"  # over max_concurrent
        assert await hanging == "deny"  # past request_timeout
        release.set()
        metrics = Scrape((await c.get("/metrics")).text)
        assert metrics["mqttprov_authd_overloaded_total"] == 1
        assert metrics.value("mqttprov_authd_errors_total", contract="rabbitmq") == 1


# -- metrics and revocation -----------------------------------------------------------------------


async def test_metrics_count_logins_cache_hits_and_latency(fleet: Fleet) -> None:
    c, user = fleet.client, fleet.user
    assert await c.rabbit_user(user, PASSWORD, user) == "allow"
    await fleet.server.service.authenticator.settle()  # its verifier is stored
    assert await c.rabbit_user(user, PASSWORD, user) == "allow"  # verified-credential cache
    assert await c.rabbit_user(user, "wrong", user) == "deny"
    assert await c.rabbit_topic(user, user, "write", f"devices.{fleet.device.id}.t") == "allow"
    answer = await c.get("/metrics")
    assert answer.status == 200
    metrics = Scrape(answer.text)
    assert metrics.value("mqttprov_authd_logins_total", contract="rabbitmq", result="ok") == 2
    assert metrics.value("mqttprov_authd_logins_total", contract="rabbitmq", result="refused") == 1
    assert metrics.value("mqttprov_authd_checks_total", contract="rabbitmq", result="allow") == 1
    assert metrics["mqttprov_authd_cache_hits_total"] == 1
    assert metrics["mqttprov_authd_bcrypt_checks_total"] == 1
    assert metrics["mqttprov_authd_verifier_checks_total"] == 1  # the wrong password: no bcrypt
    assert metrics["mqttprov_authd_cache_hit_ratio"] == pytest.approx(1 / 3)
    assert metrics["mqttprov_authd_bcrypt_queue_depth"] == 0
    assert metrics["mqttprov_authd_principal_cache_hits_total"] == 1
    assert metrics.value("mqttprov_authd_request_seconds_count", contract="rabbitmq") == 4
    assert metrics.value("mqttprov_authd_request_seconds_bucket", contract="rabbitmq", le="+Inf") == 4
    assert metrics.types["mqttprov_authd_request_seconds"] == "histogram"
    # The same decisions in the names every process shares, and the library's process metrics.
    assert metrics.value("mqttprov_logins_total", result="accepted") == 2
    assert metrics.value("mqttprov_logins_total", result="bad_credentials") == 1
    assert metrics.value("mqttprov_password_checks_total", path="bcrypt") == 1
    assert metrics.value("mqttprov_password_checks_total", path="verifier") == 1
    assert metrics.value("mqttprov_password_checks_total", path="cache") == 1
    assert metrics["mqttprov_bcrypt_wait_seconds_count"] == 1  # the one bcrypt check
    assert metrics["mqttprov_change_feed_lag_seconds"] < 60
    assert metrics["process_cpu_seconds_total"] > 0
    assert (await c.get("/healthz")).status == 200


async def test_a_decommission_elsewhere_is_honoured_and_kicks_the_user(
    sqlite_url: str, tmp_path: Path
) -> None:
    await migrate(sqlite_url)
    kicked = tmp_path / "kicked.txt"
    # A stand-in for rabbitmqctl close_all_user_connections: append the username to a file.
    script = f"import sys; open({str(kicked)!r}, 'a').write(sys.argv[1] + '\\n')"
    settings = authd_settings(sqlite_url, kick_command=[sys.executable, "-c", script, "{username}"])
    registry = DeviceRegistry(create_engine(sqlite_url))
    try:
        device = await make_device(registry, MAC)
        user = device.mqtt_username
        topic = f"devices.{device.id}.telemetry"
        async with running_authd(settings) as (_, c):
            assert await c.rabbit_user(user, PASSWORD, user) == "allow"
            assert await c.rabbit_topic(user, user, "write", topic) == "allow"
            await registry.decommission(device.id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + REVOCATION_DEADLINE
            while await c.rabbit_topic(user, user, "write", topic) == "allow" and loop.time() < deadline:
                await asyncio.sleep(0.05)  # polling against the deadline above
            assert await c.rabbit_topic(user, user, "write", topic) == "deny"
            assert await c.rabbit_user(user, PASSWORD, user) == "deny"
            while not kicked.exists() and loop.time() < deadline + 10:
                await asyncio.sleep(0.05)
    finally:
        await registry.close()
    assert kicked.read_text().splitlines() == [user]


async def test_failures_without_an_address_never_lock_the_device_out(fleet: Fleet) -> None:
    # RabbitMQ sends no client address with a login: a lockout per (username, address) would be a
    # lockout of the username everywhere, which anyone who knows it could trigger.
    c, user = fleet.client, fleet.user
    for _ in range(12):  # past auth.lockout_after (10)
        assert await c.rabbit_user(user, "guessed-wrong", user) == "deny"
    assert await c.rabbit_user(user, PASSWORD, user) == "allow"
    # With an address (EMQX sends peerhost) the embedded broker's rule holds: that pair is locked.
    login = {"clientid": user, "username": user, "password": "guessed-wrong", "peerhost": "192.0.2.7"}
    for _ in range(10):
        assert (await c.json("/emqx/authn", login)).json()["result"] == "deny"
    assert (await c.json("/emqx/authn", login | {"password": PASSWORD})).json()["result"] == "deny"
    assert (await c.json("/emqx/authn", login | {"password": PASSWORD, "peerhost": "192.0.2.8"})).json()[
        "result"
    ] == "allow"
