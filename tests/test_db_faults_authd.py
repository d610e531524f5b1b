"""authd while the registry fails, over real HTTP: its topic-check cache stops vouching for
principals once the change feed cannot be read (checks go to the registry, and are denied when it
cannot answer); logins it cannot decide are denied (EMQX: ``ignore``), counted, and told once per
outage, never as an ERROR per request.

In-process faults on SQLite (a feed that cannot be read, a registry that cannot answer), and a whole
outage of PostgreSQL through the fault-injecting proxy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from broker.http.authd import AuthdServer
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import DeviceInfo, DeviceRegistry, create_engine
from tests.auth_support import PASSWORD, eventually, make_device, polled
from tests.authd_support import AuthdClient, authd_settings, migrate, running_authd
from tests.faulty_proxy import FaultyProxy
from tests.metrics_support import Scrape

# slow, the whole file: an authd through a fault proxy and outages that must be waited out.
pytestmark = pytest.mark.slow

Call = Callable[..., Awaitable[Any]]
#: Generous bound on "the feed went stale" / "the follower read it again" (a trust window is 2 s).
SETTLE = 30.0


class Outage:
    """Makes these registry methods fail as the driver's errors do while :attr:`down` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.down = True
        for name in names:
            monkeypatch.setattr(DeviceRegistry, name, self._failing(getattr(DeviceRegistry, name)))

    def _failing(self, real: Call) -> Call:
        async def failing(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise RegistryUnavailableError("database unavailable: [Errno 111] Connect call failed")
            return await real(*args, **kwargs)

        return failing


@dataclass
class Authd:
    """A running authd, a client posting as the brokers do, and one device it knows."""

    server: AuthdServer
    client: AuthdClient
    device: DeviceInfo

    @property
    def user(self) -> str:
        return self.device.mqtt_username

    async def emqx_login(self) -> str:
        body = {"clientid": self.user, "username": self.user, "password": PASSWORD}
        result: str = (await self.client.json("/emqx/authn", body)).json()["result"]
        return result

    async def emqx_publish(self) -> str:
        body = {
            "clientid": self.user,
            "username": self.user,
            "topic": f"devices/{self.device.id}/telemetry",
            "action": "publish",
        }
        result: str = (await self.client.json("/emqx/authz", body)).json()["result"]
        return result

    @property
    def fresh(self) -> bool:
        """The change feed was read recently enough for the caches to vouch for principals."""
        return self.server.service.authenticator.cache.fresh

    async def metrics(self) -> Scrape:
        return Scrape((await self.client.get("/metrics")).text)


@asynccontextmanager
async def _authd(database_url: str, registry_url: str | None = None) -> AsyncIterator[Authd]:
    await migrate(database_url)
    cli = DeviceRegistry(create_engine(database_url))
    try:
        device = await make_device(cli, "02:00:00:00:19:21")
    finally:
        await cli.close()
    async with running_authd(authd_settings(registry_url or database_url)) as (server, client):
        yield Authd(server, client, device)


@pytest.fixture
async def authd(sqlite_url: str) -> AsyncIterator[Authd]:
    async with _authd(sqlite_url) as running:
        yield running


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(level, message) of every ``database ...`` line of the outage story; no traceback anywhere."""
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.WARNING)
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("database ")]


async def test_topic_checks_leave_the_cache_once_the_feed_is_stale(
    authd: Authd, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await authd.emqx_login() == "allow"
    assert await authd.emqx_publish() == "allow"
    assert (await authd.metrics())["mqttprov_authd_principal_cache_hits_total"] == 1

    # The feed cannot be read; the registry itself still answers.
    feed = Outage(monkeypatch, "changes_since")
    await eventually(polled(lambda: authd.fresh), lambda fresh: not fresh, timeout=SETTLE)
    assert await authd.emqx_publish() == "allow"  # from the registry, not from memory
    assert (await authd.metrics())["mqttprov_authd_principal_cache_hits_total"] == 1

    # Now the registry cannot answer either: denied, never answered from memory.
    Outage(monkeypatch, "find_credentials_by_username")
    assert await authd.emqx_publish() == "deny"
    assert (await authd.metrics())["mqttprov_authd_principal_cache_hits_total"] == 1
    del feed


async def test_undecided_logins_are_denied_or_ignored_and_told_once(
    authd: Authd, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    c, user = authd.client, authd.user
    outage = Outage(monkeypatch, "changes_since", "find_credentials_by_username")
    # A round of the follower that began before the fault may still succeed: wait for a failed one.
    await eventually(polled(lambda: authd.server.service.outage.down), lambda down: down, timeout=SETTLE)
    for _ in range(3):
        assert await c.rabbit_user(user, PASSWORD, user) == "deny"
        assert await authd.emqx_login() == "ignore"  # "not decided": EMQX asks its next authenticator
    metrics = await authd.metrics()
    assert metrics.value("mqttprov_authd_errors_total", contract="rabbitmq") == 3
    assert metrics.value("mqttprov_authd_errors_total", contract="emqx") == 3
    assert "mqttprov_authd_logins_total" not in metrics.names()  # undecided: neither ok nor refused

    outage.down = False
    await eventually(polled(lambda: authd.server.service.outage.down), lambda down: not down, timeout=SETTLE)
    assert await authd.emqx_login() == "allow"

    lines = outage_lines(caplog)
    assert [level for level, _ in lines if level == "WARNING"] == ["WARNING"]
    assert lines[0][1].startswith("database unavailable (")
    assert sum(text.startswith("database recovered") for _, text in lines) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert PASSWORD not in caplog.text


@pytest.mark.postgres
async def test_a_postgres_outage_through_the_proxy(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = make_url(postgres_url)
    async with FaultyProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        async with _authd(postgres_url, through) as authd:
            assert await authd.emqx_login() == "allow"
            assert await authd.emqx_publish() == "allow"

            await proxy.set_mode("refuse")
            await eventually(polled(lambda: authd.fresh), lambda fresh: not fresh, timeout=SETTLE)
            assert await authd.emqx_publish() == "deny"
            assert await authd.emqx_login() == "ignore"
            assert await authd.client.rabbit_user(authd.user, PASSWORD, authd.user) == "deny"

            await proxy.set_mode("pass")
            await eventually(polled(lambda: authd.fresh), lambda fresh: fresh, timeout=SETTLE)
            assert await authd.emqx_publish() == "allow"
            assert await authd.emqx_login() == "allow"

    lines = outage_lines(caplog)
    assert [level for level, _ in lines if level == "WARNING"] == ["WARNING"]
    assert sum(text.startswith("database recovered") for _, text in lines) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
