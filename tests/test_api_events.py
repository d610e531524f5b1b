"""A device's events by page, and the fleet's event stream (Server-Sent Events): an enrolment and a
presence change made by a broker arrive on the stream of an API in another process's place, and
a stream resumed with Last-Event-ID gets what it missed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from broker.embedded import BrokerServer
from broker.http.api import events as api_events
from provisioning.registry.tokens import Scope
from tests.api_support import Api, api_settings, assert_problem, running_api
from tests.mqtt_clients import ACCEPTED, enrol, login

#: Presence is read SETTLE (2 s) behind the clock, every POLL (1 s): well within this.
TIMEOUT = 10.0


@dataclass
class Event:
    id: str | None
    kind: str | None
    data: dict[str, Any]


async def events_of(response: httpx.Response) -> AsyncIterator[Event | str]:
    """The stream's events, and its comment lines as text (``": keep-alive"``)."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield line
        elif line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif "data" in fields:
            yield Event(fields.get("id"), fields.get("event"), json.loads(fields["data"]))
            fields = {}
        else:
            fields = {}


async def next_event(stream: AsyncIterator[Event | str], kind: str, mac: str) -> Event:
    """The next ``kind`` event about ``mac`` on ``stream``, within :data:`TIMEOUT`."""
    async with asyncio.timeout(TIMEOUT):
        async for item in stream:
            if isinstance(item, Event) and item.kind == kind and item.data["mac"] == mac:
                return item
    raise AssertionError(f"the stream ended before a {kind} event of {mac}")


@pytest.fixture
async def api_beside(broker: BrokerServer) -> AsyncIterator[Api]:
    """``mqttprov api`` on the broker's registry, as a process of its own would run."""
    async with running_api(api_settings(broker.settings.database.url)) as api:
        yield api


async def test_an_enrolment_and_presence_reach_the_stream_and_resume_after_last_event_id(
    broker: BrokerServer, api_beside: Api
) -> None:
    headers = await api_beside.headers(Scope.READ)
    mac = "02:00:00:00:f0:01"
    async with api_beside.client.stream("GET", "/api/v1/events/stream", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = aiter(events_of(response))
        creds = await enrol(broker, mac)
        enrolled = await next_event(stream, "enrolment", mac)
        assert enrolled.data["kind"] == "provisioned"
        assert enrolled.data["device_id"] == creds["device_id"]
        assert await asyncio.to_thread(login, broker.settings.broker.port, creds) == ACCEPTED
        presence = await next_event(stream, "presence", mac)
        assert presence.data["device_id"] == creds["device_id"]
        assert presence.data["status"] in {"online", "offline"}  # the raw socket leaves at once
    assert enrolled.id is not None

    # Resumed after the enrolment: the presence change again, and the next enrolment; not the first.
    other = "02:00:00:00:f0:02"
    await enrol(broker, other)
    resumed = {**headers, "Last-Event-ID": enrolled.id}
    async with api_beside.client.stream("GET", "/api/v1/events/stream", headers=resumed) as response:
        stream = aiter(events_of(response))
        wanted = {("presence", mac), ("enrolment", other)}
        got: list[tuple[str | None, str]] = []
        async with asyncio.timeout(TIMEOUT):
            async for item in stream:
                if isinstance(item, Event):
                    got.append((item.kind, item.data["mac"]))
                    if wanted <= set(got):
                        break
        assert ("enrolment", mac) not in got
    # A fresh stream starts now: nothing of before.
    async with api_beside.client.stream("GET", "/api/v1/events/stream", headers=headers) as response:
        quiet = api_events.POLL * 2 + api_events.SETTLE.total_seconds()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_first_event(response), quiet)


async def _first_event(response: httpx.Response) -> Event:
    async for item in events_of(response):
        if isinstance(item, Event):
            return item
    raise AssertionError("the stream ended")


async def test_a_quiet_stream_sends_keep_alive_comments(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_events, "KEEPALIVE", 0.2)
    async with running_api(api_settings(sqlite_url)) as api:
        headers = await api.headers(Scope.READ)
        async with api.client.stream("GET", "/api/v1/events/stream", headers=headers) as response:
            stream = aiter(events_of(response))
            async with asyncio.timeout(TIMEOUT):
                assert await anext(stream) == ": keep-alive"


async def test_a_stream_ends_after_stream_seconds_and_when_its_token_is_revoked(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_events, "TOKEN_RECHECK", 0.2)
    async with running_api(api_settings(sqlite_url, api={"stream_seconds": 1})) as api:
        headers = await api.headers(Scope.READ)
        async with asyncio.timeout(TIMEOUT):
            response = await api.client.get("/api/v1/events/stream", headers=headers)
        assert response.text.startswith("retry: ")

    async with running_api(api_settings(sqlite_url)) as api:
        issued = await api.server.services.tokens.create("streamer", frozenset({Scope.READ}))
        headers = {"Authorization": f"Bearer {issued.secret}"}
        async with api.client.stream("GET", "/api/v1/events/stream", headers=headers) as response:
            await api.server.services.tokens.revoke("streamer")
            async with asyncio.timeout(TIMEOUT):
                await response.aread()


async def test_a_devices_events_by_page(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        headers = await api.headers(Scope.READ, Scope.WRITE)
        added = (
            await api.client.post("/api/v1/devices", json={"mac": "02:00:00:00:f1:01"}, headers=headers)
        ).json()
        for n in range(4):
            path = f"/api/v1/devices/{added['id']}/labels"
            await api.client.put(path, json={"labels": {"n": str(n)}}, headers=headers)
        seen: list[dict[str, Any]] = []
        query = "?limit=2"
        while True:
            page = (
                await api.client.get(f"/api/v1/devices/{added['id']}/events{query}", headers=headers)
            ).json()
            seen += page["events"]
            if page["next_before"] is None:
                break
            query = f"?limit=2&before={page['next_before']}"
        assert [e["kind"] for e in seen] == ["labelled"] * 4 + ["added"]
        assert [e["id"] for e in seen] == sorted((e["id"] for e in seen), reverse=True)
        missing = await api.client.get("/api/v1/devices/02:00:00:00:f1:99/events", headers=headers)
        assert_problem(missing, 404, "NOT_FOUND")
