"""The HTTP API in tests: ``mqttprov api`` in-process on a free port, an httpx client, tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any

import httpx

from broker.http.api import StandaloneApi
from config import Settings
from provisioning.registry.tokens import Scope
from tests.helpers import broker_settings

_names = count(1)


def api_settings(database_url: str, **sections: Mapping[str, Any]) -> Settings:
    """Settings for an API on a loopback port the OS picks, cheap bcrypt, these sections' keys."""
    base = broker_settings(database_url).model_dump()
    base["api"] = {"host": "127.0.0.1", "port": 0}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Settings.model_validate(base)


@dataclass
class Api:
    """A running API and a client for it."""

    server: StandaloneApi
    client: httpx.AsyncClient

    async def token(self, *scopes: Scope) -> str:
        """The secret of a new token holding ``scopes``."""
        issued = await self.server.services.tokens.create(f"test-{next(_names)}", frozenset(scopes))
        return issued.secret

    async def headers(self, *scopes: Scope) -> dict[str, str]:
        """``Authorization`` for a new token holding ``scopes``."""
        return {"Authorization": f"Bearer {await self.token(*scopes)}"}


@asynccontextmanager
async def running_api(settings: Settings) -> AsyncIterator[Api]:
    """``mqttprov api`` on ``settings``, accepting requests when yielded, stopped afterwards."""
    async with (
        StandaloneApi(settings) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        yield Api(server, client)


def assert_problem(response: httpx.Response, status: int, error_code: str) -> dict[str, Any]:
    """Check an RFC 7807 answer: its status, media type, shape and ``error_code``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "detail", "error_code"}, body
    assert body["status"] == status
    assert body["error_code"] == error_code, body
    assert body["type"] == f"urn:mqttprov:problem:{error_code}"
    assert body["detail"]
    assert "Traceback" not in body["detail"]
    return body
