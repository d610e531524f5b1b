"""Two ``mqttprov authd`` processes on one PostgreSQL: a credential change made in a third process
(the operator CLI) is honoured by both within 2 s, woken by LISTEN/NOTIFY.

The change-feed poll is set to its slowest (2 s), so meeting the deadline rests on the NOTIFY.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from tests.auth_support import ACCOUNT_PASSWORD, PASSWORD, make_account, make_device
from tests.authd_support import (
    REVOCATION_DEADLINE,
    AuthdClient,
    authd_process,
    client_for,
    migrate,
    write_authd_config,
)
from tests.helpers import free_ports, run_mqttprov

# slow, the whole file: two mqttprov authd processes.
pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def within_deadline(check: Callable[[], Awaitable[bool]]) -> bool:
    """True as soon as ``check`` holds, False if it still does not after the revocation deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REVOCATION_DEADLINE
    while not await check():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)  # polling against the deadline above
    return True


@pytest.mark.parametrize("change", ["decommission", "rotate"])
async def test_a_change_elsewhere_is_honoured_by_both_authd_processes_within_2s(
    postgres_url: str, tmp_path: Path, change: str
) -> None:
    await migrate(postgres_url)
    registry = DeviceRegistry(create_engine(postgres_url))
    try:
        device = await make_device(registry, "02:00:00:00:0c:01")
        await make_account(AccountRegistry(registry.engine), "backend", ["subscribe devices/+/telemetry"])
    finally:
        await registry.close()
    user, topic = device.mqtt_username, f"devices.{device.id}.telemetry"
    config = write_authd_config(tmp_path / "cli.toml", postgres_url, 1)
    ports = free_ports(2)
    # The slowest poll allowed: only a NOTIFY can make the deadline.
    slow = {"revocation_poll_interval": 2}
    configs = [write_authd_config(tmp_path / f"authd-{p}.toml", postgres_url, p, auth=slow) for p in ports]
    with ExitStack() as processes:
        urls = [
            processes.enter_context(authd_process(c, p, tmp_path))
            for c, p in zip(configs, ports, strict=True)
        ]
        async with client_for(urls[0]) as a, client_for(urls[1]) as b:
            for c in (a, b):
                assert await c.rabbit_user(user, PASSWORD, user) == "allow"
                assert await c.rabbit_topic(user, user, "write", topic) == "allow"
                assert await c.rabbit_user("backend", ACCOUNT_PASSWORD, "backend-1") == "allow"
            if change == "decommission":
                command = ["devices", "decommission", str(device.id)]
            else:
                command = ["accounts", "rotate", "backend", "--json"]
            done = await asyncio.to_thread(run_mqttprov, *command, "--config", str(config), cwd=tmp_path)
            assert done.returncode == 0, done.stderr

            def honoured(c: AuthdClient) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    if change == "decommission":
                        return await c.rabbit_topic(user, user, "write", topic) == "deny"
                    return await c.rabbit_user("backend", ACCOUNT_PASSWORD, "backend-1") == "deny"

                return check

            assert list(await asyncio.gather(within_deadline(honoured(a)), within_deadline(honoured(b)))) == [
                True,
                True,
            ]
            for c in (a, b):
                if change == "decommission":
                    assert await c.rabbit_user(user, PASSWORD, user) == "deny"
                else:
                    new_password = json.loads(done.stdout)["password"]
                    assert await c.rabbit_user("backend", new_password, "backend-1") == "allow"
                    assert (
                        await c.rabbit_topic("backend", "backend-1", "read", "devices.*.telemetry") == "allow"
                    )
