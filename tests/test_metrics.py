"""``/metrics`` and ``/ready`` of real servers on free ports, scraped after real traffic.

Each scrape is parsed with prometheus_client's own parser (tests/metrics_support.py), and each
test asserts that the counters moved by what the traffic did, no more.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from broker.embedded.server import BrokerServer, with_metrics
from broker.http.api.hosted import BrokerWithApi
from config import Settings
from provisioning.registry.tokens import Scope
from tests.api_support import api_settings, assert_problem, running_api
from tests.auth_support import RawSession, eventually, login_code
from tests.faulty_proxy import FaultyProxy
from tests.helpers import broker_settings, mqttprov_executable, run_mqttprov, write_config
from tests.metrics_support import Scrape
from tests.mosquitto_node import call, killed, mosquitto_missing, mosquitto_node, stack_sections
from tests.mqtt_clients import assert_ok, request_provisioning
from tests.test_serve import ServeProcess

MAC = "02:00:00:00:17:01"
ACCEPTED, BAD_CREDENTIALS = 0, 4


@asynccontextmanager
async def serving(database_url: str, **api: object) -> AsyncIterator[tuple[BrokerWithApi, httpx.AsyncClient]]:
    """``mqttprov serve`` with the API, in-process on free ports, and a client of its API."""
    settings = api_settings(database_url, api={"enabled": True, **api})
    async with BrokerWithApi(settings) as served, httpx.AsyncClient(base_url=served.api.url) as client:
        yield served, client


async def scrape(client: httpx.AsyncClient, **headers: str) -> Scrape:
    answer = await client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(answer.text)


async def test_serve_counts_logins_by_path_provisioning_and_kicks(sqlite_url: str) -> None:
    async with serving(sqlite_url) as (served, client):
        before = await scrape(client)
        assert before.value("mqttprov_logins_total", result="accepted") == 0
        assert before["mqttprov_sessions"] == 0
        assert before["process_resident_memory_bytes"] > 0  # the library's process collector
        assert before.types["mqttprov_bcrypt_wait_seconds"] == "summary"

        creds = (await client.post("/api/v1/provision", json={"mac": MAC})).json()
        port = served.broker.settings.broker.port
        user, password = creds["mqtt_username"], creds["mqtt_password"]
        authenticator = served.broker.services.authenticator

        def connect(secret: str) -> int:
            return login_code(port, user, username=user, password=secret)

        # First login: bcrypt (no verifier yet); the second, from the cache; a wrong password is
        # refused by the verifier the first one stored; after the cache is cleared (a restart's
        # worth), the right one is verified by that verifier.
        assert await asyncio.to_thread(connect, password) == ACCEPTED
        await authenticator.settle()
        assert await asyncio.to_thread(connect, password) == ACCEPTED
        assert await asyncio.to_thread(connect, "wrong-password") == BAD_CREDENTIALS
        authenticator.cache.clear()
        assert await asyncio.to_thread(connect, password) == ACCEPTED

        # A live session, kicked by a decommission.
        with RawSession(port) as held:
            assert await asyncio.to_thread(held.connect, user, username=user, password=password) == ACCEPTED
            live = await eventually(lambda: scrape(client), lambda s: s["mqttprov_sessions"] == 1)
            assert live["mqttprov_connections"] >= 1
            await served.broker.registry.decommission(uuid.UUID(creds["device_id"]))
            assert await asyncio.to_thread(held.closed_by_server, 5.0)

        after = await eventually(lambda: scrape(client), lambda s: s["mqttprov_kicks_total"] == 1)
        assert after.value("mqttprov_provisioning_requests_total", result="ok") == 1
        assert after.value("mqttprov_logins_total", result="accepted") == 4
        assert after.value("mqttprov_logins_total", result="bad_credentials") == 1
        assert after.value("mqttprov_password_checks_total", path="bcrypt") == 1
        assert after.value("mqttprov_password_checks_total", path="cache") == 2
        assert after.value("mqttprov_password_checks_total", path="verifier") == 2
        # The first login's check waited for a worker (the enrolment's hash too, unless the
        # credential pool had one ready: its idle-time hashes are not counted).
        assert after["mqttprov_bcrypt_wait_seconds_count"] >= 1
        assert after["mqttprov_bcrypt_turn_wait_seconds_count"] == 1
        assert after["mqttprov_bcrypt_queue_depth"] == 0
        assert after["mqttprov_change_feed_lag_seconds"] < 30
        assert after["mqttprov_change_feed_position"] >= 1
        assert after.value("mqttprov_deliveries_dropped_total", reason="slow_subscriber") == 0

        # A refused provisioning (the device is decommissioned now) is counted by its error code.
        refused = await client.post("/api/v1/provision", json={"mac": MAC})
        assert refused.status_code >= 400
        code = refused.json()["error_code"]
        again = await scrape(client)
        assert again.value("mqttprov_provisioning_requests_total", result=code) == 1


async def test_openmetrics_when_asked(sqlite_url: str) -> None:
    async with serving(sqlite_url) as (_, client):
        answer = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert answer.headers["content-type"].startswith("application/openmetrics-text")
        assert answer.text.endswith("# EOF\n")


async def test_metrics_behind_a_read_token_or_off(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url, api={"metrics": "token"})) as api:
        assert_problem(await api.client.get("/metrics"), 401, "UNAUTHORIZED")
        assert_problem(
            await api.client.get("/metrics", headers=await api.headers(Scope.WRITE)), 403, "FORBIDDEN"
        )
        answer = await api.client.get("/metrics", headers=await api.headers(Scope.READ))
        assert answer.status_code == 200
        assert Scrape(answer.text)["mqttprov_bcrypt_queue_depth"] == 0
    async with running_api(api_settings(sqlite_url, api={"metrics": "off"})) as api:
        assert_problem(await api.client.get("/metrics"), 404, "NOT_FOUND")


async def test_the_standalone_api_reports_its_own_process(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url)) as api:
        enrolled = await api.client.post("/api/v1/provision", json={"mac": MAC})
        assert enrolled.status_code == 200
        metrics = await scrape(api.client)
        assert metrics.value("mqttprov_provisioning_requests_total", result="ok") == 1
        assert metrics["mqttprov_bcrypt_workers"] >= 1
        assert metrics["process_open_fds"] > 0
        assert "mqttprov_logins_total" not in metrics.names()  # no broker, no logins here
        assert (await api.client.get("/ready")).status_code == 200


async def test_ready_needs_the_mqtt_listener(sqlite_url: str) -> None:
    async with serving(sqlite_url) as (served, client):
        assert (await client.get("/ready")).json() == {"status": "ok"}
        await served.broker.broker.close_listeners()  # the listener is gone; the API still answers
        assert_problem(await client.get("/ready"), 503, "UNAVAILABLE")
        assert (await client.get("/health")).status_code == 200


@pytest.mark.postgres
async def test_ready_fails_while_the_registry_is_unreachable(postgres_url: str) -> None:
    url = make_url(postgres_url)
    async with FaultyProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        async with serving(through) as (_, client):
            assert (await client.get("/ready")).status_code == 200
            await proxy.set_mode("refuse")
            refused = await client.get("/ready")
            assert_problem(refused, 503, "UNAVAILABLE")
            assert refused.headers["retry-after"]
            await proxy.set_mode("stall")  # no answer at all: not ready either, within the timeout
            stalled = await client.get("/ready", timeout=15.0)
            assert_problem(stalled, 503, "UNAVAILABLE")
            await proxy.set_mode("pass")
            await eventually(lambda: client.get("/ready"), lambda answer: answer.status_code == 200, 15.0)


async def test_serve_without_the_api_answers_metrics_on_the_metrics_port(sqlite_url: str) -> None:
    base = broker_settings(sqlite_url)
    settings = Settings.model_validate(
        base.model_dump() | {"api": {"enabled": False}, "metrics": {"port": 0}}
    )
    server = BrokerServer(settings)
    async with with_metrics(server) as url, httpx.AsyncClient() as client:
        assert url is not None
        port = server.settings.broker.port
        refused = await asyncio.to_thread(login_code, port, "svc-1", username="nobody", password="wrong")
        assert refused == 4
        answer = await client.get(url)
        assert answer.status_code == 200
        scraped = Scrape(answer.text)
        assert scraped.value("mqttprov_logins_total", result="bad_credentials") == 1
        assert scraped["mqttprov_connections"] >= 0
    async with with_metrics(BrokerServer(base)) as none:
        assert none is None  # no [metrics] port: no listener


def _metrics_url(process: ServeProcess) -> str:
    (line,) = [message for message in process.messages if message.startswith("metrics on ")]
    return line.removeprefix("metrics on ")


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing()))
async def test_bridge_and_worker_answer_metrics_on_their_own_port(tmp_path: Path, sqlite_url: str) -> None:
    env = {"MQTTPROV_METRICS__PORT": "0"}
    with mosquitto_node(tmp_path / "mosquitto") as node:
        config = write_config(tmp_path / "mqttprov.toml", stack_sections(node, sqlite_url))
        migrated = await asyncio.to_thread(
            run_mqttprov, "db", "upgrade", "--config", str(config), cwd=tmp_path
        )
        assert migrated.returncode == 0, migrated.stderr
        running = [await _spawn(config, env, "bridge", "run")]
        try:
            await running[0].read_until("bridge following the credential change feed")
            running.append(await _spawn(config, env, "worker"))
            await running[1].read_until("provisioning worker serving")
            bridge, worker = (_metrics_url(process) for process in running)
            assert bridge.startswith("http://127.0.0.1:")  # loopback by default
            mac = "aa:bb:cc:00:17:01"
            body = await call(request_provisioning, node.provision_port, mac, {"mac": mac})
            assert body is not None
            assert_ok(body)
            retired = await asyncio.to_thread(
                run_mqttprov, "devices", "decommission", mac, "--config", str(config), cwd=tmp_path
            )
            assert retired.returncode == 0, retired.stderr
            async with httpx.AsyncClient() as client:
                served = Scrape((await client.get(worker)).text)
                assert served.value("mqttprov_provisioning_requests_total", result="ok") == 1
                assert served["mqttprov_bcrypt_workers"] >= 1
                assert served["process_cpu_seconds_total"] > 0

                async def bridge_scrape() -> Scrape:
                    return Scrape((await client.get(bridge)).text)

                followed = await eventually(
                    bridge_scrape, lambda s: s["mqttprov_bridge_revocations_total"] == 1
                )
                assert followed["mqttprov_change_feed_lag_seconds"] < 30
            for process in running:
                assert await process.stop(signal.SIGTERM) == 0
        finally:
            await killed(running)


async def _spawn(config: Path, env: dict[str, str], *args: str) -> ServeProcess:
    process = await asyncio.create_subprocess_exec(
        mqttprov_executable(),
        *args,
        "--config",
        str(config),
        cwd=config.parent,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return ServeProcess(process)
