"""An authd on a loopback port and an HTTP client that speaks to it like the brokers do."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from broker.http.authd import AuthdServer
from config import Settings
from provisioning.registry import create_engine
from provisioning.registry.migrate import upgrade
from tests.helpers import broker_settings, mqttprov_executable

SECRET = "authd-shared-secret-0003"
#: How soon a credential change must be honoured by every authd (the acceptance criterion).
REVOCATION_DEADLINE = 2.0


def authd_settings(database_url: str, **authd: Any) -> Settings:
    """Settings for a private authd (the shared secret, bcrypt cost 4) with these keys.

    Port 0: the running server's ``settings.authd.port`` and ``url`` hold the port it bound.
    """
    base = broker_settings(database_url)
    section = {"host": "127.0.0.1", "port": 0, "shared_secret": SECRET} | authd
    data = base.model_dump() | {"authd": section}
    data["auth"] |= {"max_refusal_delay": 0.01}
    return Settings.model_validate(data)


async def migrate(database_url: str) -> None:
    """Create the registry tables (authd expects ``mqttprov db upgrade`` to have run)."""
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def basic(secret: str = SECRET, user: str = "broker") -> str:
    """The ``Authorization`` header a URL ``http://user:secret@host/...`` makes a client send."""
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


@dataclass
class Answer:
    """One HTTP answer: status, content type and body (text, and JSON when it is JSON)."""

    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.text)


class AuthdClient:
    """Posts to authd as a broker would: form-encoded (RabbitMQ) or JSON (EMQX, VerneMQ, go-auth)."""

    def __init__(self, url: str, session: aiohttp.ClientSession, authorization: str | None) -> None:
        self.url = url
        self._session = session
        self.authorization = authorization

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.authorization is not None:
            headers["Authorization"] = self.authorization
        return headers

    async def form(self, path: str, fields: Mapping[str, str], **headers: str) -> Answer:
        """POST ``fields`` as application/x-www-form-urlencoded."""
        async with self._session.post(
            self.url + path, data=dict(fields), headers=self._headers(headers)
        ) as r:
            return Answer(r.status, r.content_type, await r.text())

    async def json(self, path: str, body: Any, **headers: str) -> Answer:
        """POST ``body`` as application/json."""
        async with self._session.post(self.url + path, json=body, headers=self._headers(headers)) as r:
            return Answer(r.status, r.content_type, await r.text())

    async def raw(self, path: str, data: bytes, content_type: str) -> Answer:
        """POST bytes as they are (malformed bodies)."""
        headers = self._headers({"Content-Type": content_type})
        async with self._session.post(self.url + path, data=data, headers=headers) as r:
            return Answer(r.status, r.content_type, await r.text())

    async def get(self, path: str) -> Answer:
        """GET (``/healthz``, ``/metrics``)."""
        async with self._session.get(self.url + path) as r:
            return Answer(r.status, r.content_type, await r.text())

    async def rabbit_user(self, username: str, password: str, client_id: str) -> str:
        """RabbitMQ 3.10's user_path request for an MQTT CONNECT; the body of the answer."""
        fields = {"username": username, "password": password, "vhost": "/", "client_id": client_id}
        return (await self.form("/rabbitmq/user", fields)).text

    async def rabbit_topic(self, username: str, client_id: str, permission: str, routing_key: str) -> str:
        """RabbitMQ 3.10's topic_path request (``write`` = publish, ``read`` = subscribe)."""
        fields = {
            "username": username,
            "vhost": "/",
            "resource": "topic",
            "name": "amq.topic",
            "permission": permission,
            "tags": "",
            "routing_key": routing_key,
            "variable_map.client_id": client_id,
            "variable_map.username": username,
            "variable_map.vhost": "/",
        }
        return (await self.form("/rabbitmq/topic", fields)).text


@asynccontextmanager
async def client_for(url: str, authorization: str | None = None) -> AsyncIterator[AuthdClient]:
    """An HTTP client for the authd at ``url`` (Bearer secret unless told otherwise)."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield AuthdClient(url, session, authorization if authorization is not None else f"Bearer {SECRET}")


@asynccontextmanager
async def running_authd(settings: Settings) -> AsyncIterator[tuple[AuthdServer, AuthdClient]]:
    """An in-process authd (database migrated first) and a client holding the secret."""
    async with AuthdServer(settings) as server, client_for(server.url) as client:
        yield server, client


def write_authd_config(
    path: Path, database_url: str, port: int, *, auth: Mapping[str, Any] | None = None, **authd: Any
) -> Path:
    """A TOML file for an ``mqttprov authd`` process: cheap bcrypt, the secret, these ``[authd]`` keys."""
    sections = {
        "database": {"url": database_url},
        "auth": {"bcrypt_cost": 4, "max_refusal_delay": 0.01} | dict(auth or {}),
        "authd": {"host": "127.0.0.1", "port": port, "shared_secret": SECRET} | authd,
    }
    # JSON strings, numbers and arrays of strings are valid TOML values.
    lines = [
        line
        for name, values in sections.items()
        for line in (f"[{name}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items()))
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@contextmanager
def authd_process(config: Path, port: int, cwd: Path) -> Iterator[str]:
    """``mqttprov authd --config CONFIG`` as a real process until its /healthz answers; its URL.

    SIGTERM on exit. Its log is ``cwd/authd-PORT.log``.
    """
    log = cwd / f"authd-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [mqttprov_executable(), "authd", "--config", str(config)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"authd did not become healthy:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)  # polling against the deadline above
        yield url
    finally:
        process.terminate()
        code = process.wait(timeout=30)
    # Reached only when the body did not fail: SIGTERM is a clean stop.
    assert code == 0, f"authd exited {code}:\n{log.read_text(errors='replace')}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False
