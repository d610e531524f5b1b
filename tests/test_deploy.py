"""Running as a service: SIGHUP never ends ``serve`` or ``authd``, and the systemd units verify."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from provisioning.registry.migrate import head_revision
from tests.authd_support import migrate, write_authd_config
from tests.helpers import connack_code, free_port, mqttprov_executable, write_config
from tests.rabbitmq_cluster import KICK_EXPRESSION
from tests.test_serve import NOT_AUTHORIZED, ServeProcess, serving

# slow, the whole file: runs mqttprov serve and authd processes.
pytestmark = pytest.mark.slow

HANGUP_LINE = "received SIGHUP: nothing reloaded (restart to apply configuration changes)"


async def test_sighup_leaves_serve_serving(tmp_path: Path, sqlite_url: str) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "mqttprov.toml",
        {"broker": {"host": "127.0.0.1", "port": port}, "database": {"url": sqlite_url}},
    )
    async with serving(config, tmp_path) as served:
        for _ in range(2):  # a second one too: the handler stays in place
            served.process.send_signal(signal.SIGHUP)
            await served.read_until("received SIGHUP")
            assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == NOT_AUTHORIZED
        assert served.process.returncode is None
        assert await served.stop(signal.SIGTERM) == 0
    assert served.messages.count(HANGUP_LINE) == 2
    assert f"database migrated from empty to {head_revision()}" in served.messages
    assert served.messages[-1] == "broker stopped"


def _healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return int(answer.status)


@asynccontextmanager
async def started(executable: str | Path, *args: str, cwd: Path, ready: str) -> AsyncIterator[ServeProcess]:
    """``executable ARGS`` (a long-running mqttprov) once a stderr line contained ``ready``; killed
    on the way out if still running."""
    process = await asyncio.create_subprocess_exec(
        executable,
        *args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    served = ServeProcess(process)
    try:
        await served.read_until(ready)
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def test_sighup_leaves_authd_serving(tmp_path: Path, sqlite_url: str) -> None:
    await migrate(sqlite_url)
    port = free_port()
    config = write_authd_config(tmp_path / "mqttprov.toml", sqlite_url, port)
    command = ("authd", "--config", str(config))
    async with started(mqttprov_executable(), *command, cwd=tmp_path, ready="authd listening on") as served:
        served.process.send_signal(signal.SIGHUP)
        await served.read_until("received SIGHUP")
        assert await asyncio.to_thread(_healthz, port) == 200
        assert await served.stop(signal.SIGTERM) == 0
    assert HANGUP_LINE in served.messages
    assert served.messages[-1] == "authd stopped"


# -- the systemd units -----------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ["mqttprov.service", "mqttprov-authd.service"]
INSTALLED = "/opt/mqttprov/bin/mqttprov"


def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_hardened(name: str) -> None:
    directives = _directives(DEPLOY / name)
    expected = {
        "User": ["mqttprov"],
        "StateDirectory": ["mqttprov"],
        "WorkingDirectory": ["/var/lib/mqttprov"],
        "ConfigurationDirectory": ["mqttprov"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
        "AmbientCapabilities": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "UMask": ["0077"],
    }
    assert {key: directives.get(key) for key in expected} == expected
    assert directives["SystemCallFilter"][0] == "@system-service"
    command = "authd" if "authd" in name else "serve"
    assert directives["ExecStart"] == [f"{INSTALLED} {command} --config /etc/mqttprov/mqttprov.toml"]
    # SIGHUP reloads nothing: a reload must not pretend otherwise.
    assert "ExecReload" not in directives


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies(tmp_path: Path, name: str) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's installed one.
    unit = tmp_path / name
    unit.write_text((DEPLOY / name).read_text().replace(INSTALLED, mqttprov_executable()), encoding="utf-8")

    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert name not in done.stderr, done.stderr  # warnings about the unit itself, exit 0 or not


def test_rabbitmq_kick_wrapper_runs_the_tested_expression(tmp_path: Path) -> None:
    fake = tmp_path / "rabbitmqctl"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "HOME=$HOME" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "RABBITMQCTL": str(fake), "RABBITMQ_KICK_HOME": str(tmp_path)}

    done = subprocess.run(
        [str(DEPLOY / "rabbitmq-kick"), "dev-1.x"], env=env, capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stderr
    expression = KICK_EXPRESSION.replace("{username}", "dev-1.x")
    assert done.stdout.splitlines() == [f"HOME={tmp_path}", "-n", "rabbit@mq1", "eval", expression]
    usage = subprocess.run(
        [str(DEPLOY / "rabbitmq-kick")], env=env, capture_output=True, text=True, check=False
    )
    assert usage.returncode == 2
    assert usage.stderr.startswith("usage: ")
