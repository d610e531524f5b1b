"""Provisioning while the registry fails: every request is answered, ``UNAVAILABLE`` with
``retry_after`` when it cannot be decided now, within its deadline, with one log story per outage;
a commit cut off by the deadline never leaves a device with a password that is not the stored one.

Over a real broker on a free port (and a private Mosquitto for ``mqttprov worker``); the faults are
injected into the registry's calls, as the driver's errors arrive (:class:`RegistryUnavailableError`)
or as a database that does not answer (a call that never returns).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest

import provisioning.service
from provisioning import client
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import DeviceRegistry
from tests.mosquitto_node import call, mosquitto_missing, mosquitto_stack, spy
from tests.mqtt_clients import (
    ACCEPTED,
    HOST,
    WAIT,
    assert_error,
    assert_ok,
    device_count,
    login,
    provision,
    provisioning_broker,
    provisioning_session,
)

Call = Callable[..., Awaitable[Any]]
SERVICE_LOGGER = "provisioning.service"


class Outage:
    """Makes a registry method fail as the driver's errors do while :attr:`down` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        real: Call = getattr(owner, name)
        self.down = True
        self.failures = 0

        async def failing(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.failures += 1
                raise RegistryUnavailableError("database unavailable: [Errno 111] Connect call failed")
            return await real(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)


def story(caplog: pytest.LogCaptureFixture, logger: str = SERVICE_LOGGER) -> list[tuple[str, str]]:
    """(level, first words) of each line ``logger`` wrote, and proof that none had a traceback."""
    records = [r for r in caplog.records if r.name == logger]
    assert all(r.exc_info is None for r in records), [r.getMessage() for r in records]
    return [(r.levelname, r.getMessage()) for r in records if r.levelno >= logging.INFO]


def unavailable(body: dict[str, Any], cooldown: float = 5.0) -> None:
    """The retryable reply: ``retry_after`` past the reissue cool-down, spread, bounded."""
    floor = max(provisioning.service.UNAVAILABLE_RETRY_AFTER, int(cooldown))
    assert floor <= body["retry_after"] <= floor + provisioning.service.UNAVAILABLE_SPREAD, body
    assert "ask again" in body["detail"]


async def test_requests_during_an_outage_are_answered_unavailable_then_served(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mac = "02:00:00:00:19:01"
    topic = f"provision/reply/{mac}"
    # Each request counts toward the per-MAC limit, answered or not: room for four.
    async with provisioning_broker(sqlite_url, mac_burst=4) as server:
        port = server.settings.broker.port
        outage = Outage(monkeypatch, server.registry, "find_credentials_by_mac")
        with await asyncio.to_thread(provisioning_session, port, mac) as session:
            for n in range(3):
                reply = await asyncio.to_thread(session.request, {"mac": mac, "request_id": f"r{n}"})
                body = assert_error(reply, "UNAVAILABLE", topic=topic, retry_after=True)
                assert body["request_id"] == f"r{n}"
                unavailable(body)
            assert outage.failures == 3
            assert await device_count(server) == 0

            outage.down = False
            reply = await asyncio.to_thread(session.request, {"mac": mac})
        assert reply is not None
        assert await asyncio.to_thread(login, port, reply.json()) == ACCEPTED

    lines = story(caplog)
    warnings = [text for level, text in lines if level == "WARNING"]
    assert warnings == [
        (
            "database unavailable (provisioning: requests answered UNAVAILABLE, devices ask again): "
            "database unavailable: [Errno 111] Connect call failed"
        )
    ]
    recovered = [text for _, text in lines if text.startswith("database recovered")]
    assert len(recovered) == 1
    assert recovered[0].endswith("(3 failures)")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_request_past_its_deadline_is_answered_unavailable_and_commits_nothing(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mac = "02:00:00:00:19:02"
    async with provisioning_broker(sqlite_url) as server:
        service = server.services.provisioning
        service.deadline = 0.5
        abandoned = asyncio.Event()

        async def stalled(*_: Any, **__: Any) -> Any:  # a database that does not answer
            try:
                await asyncio.Event().wait()
            finally:
                abandoned.set()

        monkeypatch.setattr(server.registry, "create_device", stalled)
        reply = await asyncio.to_thread(provision, server.settings.broker.port, mac, {"mac": mac})
        unavailable(assert_error(reply, "UNAVAILABLE", topic=f"provision/reply/{mac}", retry_after=True))
        # The write was given up at the deadline, not left to land later.
        await asyncio.wait_for(abandoned.wait(), WAIT)
        assert await device_count(server) == 0

    warnings = [text for level, text in story(caplog) if level == "WARNING"]
    late = "provisioning unavailable (requests not decided within 0.5 s: answered UNAVAILABLE)"
    assert warnings == [f"{late}: no decision within 0.5 s"]


async def test_a_commit_landing_after_the_deadline_is_replaced_by_the_next_request(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mac = "02:00:00:00:19:03"
    topic = f"provision/reply/{mac}"
    async with provisioning_broker(sqlite_url, reissue_cooldown=0) as server:
        service = server.services.provisioning
        service.deadline = 0.5
        real = server.registry.create_device
        gate, landed = asyncio.Event(), asyncio.Event()
        late: set[asyncio.Task[Any]] = set()

        async def commit_later(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            try:
                return await real(*args, **kwargs)
            finally:
                landed.set()

        async def slow_commit(*args: Any, **kwargs: Any) -> Any:
            # A COMMIT already on the wire: cancelling the caller does not stop the server.
            task = asyncio.ensure_future(commit_later(*args, **kwargs))
            late.add(task)
            return await asyncio.shield(task)

        monkeypatch.setattr(server.registry, "create_device", slow_commit)
        port = server.settings.broker.port
        with await asyncio.to_thread(provisioning_session, port, mac) as session:
            reply = await asyncio.to_thread(session.request, {"mac": mac})
            assert_error(reply, "UNAVAILABLE", topic=topic, retry_after=True)
            monkeypatch.setattr(server.registry, "create_device", real)
            gate.set()
            await asyncio.wait_for(landed.wait(), WAIT)
            # Stored, and received by nobody: the device was told nothing was issued.
            orphan = await server.registry.find_credentials_by_mac(mac)
            assert orphan is not None
            assert orphan.password_hash is not None
            assert orphan.device.activated_at is None

            service.deadline = provisioning.service.REQUEST_DEADLINE
            again = await asyncio.to_thread(session.request, {"mac": mac})
        assert again is not None
        body = again.json()
        assert assert_ok(body) == orphan.device.id  # a reissue of the same device
        record = await server.registry.find_credentials_by_mac(mac)
        assert record is not None
        assert record.password_hash is not None
        assert record.password_hash != orphan.password_hash
        assert bcrypt.checkpw(body["mqtt_password"].encode(), record.password_hash.encode())
        assert await asyncio.to_thread(login, port, body) == ACCEPTED
        await asyncio.gather(*late)


@pytest.mark.slow
async def test_the_device_client_asks_again_after_unavailable(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short pauses so the retry comes within the test's wait (the defaults are 10-20 s).
    monkeypatch.setattr(provisioning.service, "UNAVAILABLE_RETRY_AFTER", 1)
    monkeypatch.setattr(provisioning.service, "UNAVAILABLE_SPREAD", 0)
    mac = "02:00:00:00:19:04"
    async with provisioning_broker(sqlite_url, reissue_cooldown=0) as server:
        outage = Outage(monkeypatch, server.registry, "find_credentials_by_mac")
        retries: list[tuple[str, float]] = []

        def on_retry(reason: str, pause: float) -> None:
            retries.append((reason, pause))
            outage.down = False  # the database is back before the device asks again

        credentials = await asyncio.to_thread(
            client.provision, HOST, server.settings.broker.port, mac, on_retry=on_retry, deadline=WAIT
        )
        assert retries == [("UNAVAILABLE", 1.0)]
        assert await asyncio.to_thread(login, server.settings.broker.port, credentials.as_dict()) == ACCEPTED


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing()))
async def test_the_worker_answers_unavailable_through_an_outage_and_serves_after(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mac = "aa:bb:cc:00:19:05"
    topic = f"provision/reply/{mac}"
    async with mosquitto_stack(tmp_path, sqlite_url) as stack:
        worker, _ = stack.tasks["worker"]
        # The worker opened an engine of its own: fail the method for every registry.
        outage = Outage(monkeypatch, DeviceRegistry, "find_credentials_by_mac")
        with await call(spy, stack.node.provision_port, mac, topic) as session:
            for _ in range(2):
                unavailable(
                    assert_error(
                        await call(session.request, {"mac": mac}),
                        "UNAVAILABLE",
                        topic=topic,
                        retry_after=True,
                    )
                )
            outage.down = False
            again = await call(session.request, {"mac": mac})
        assert not worker.done()
        assert again is not None
        assert_ok(again.json())
        assert await call(login, stack.node.device_port, again.json()) == ACCEPTED

    warnings = [text for level, text in story(caplog) if level == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("database unavailable (provisioning: ")
    assert sum(text.startswith("database recovered") for _, text in story(caplog)) == 1
