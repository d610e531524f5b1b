"""docs/mosquitto.md's steps, run as written on a private Mosquitto (never the system's, never 1883).

Every fenced block after a ``<!-- docs-test: NAME -->`` line is a step, in the page's order: a
file's content when NAME is a file (a path, or ``mqttprov.toml`` in the working directory),
shell commands otherwise. The only changes are substitutions: ports, folders, the database, the
host name and the user Mosquitto runs as. Nothing may prompt: there is no terminal.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import free_ports, mqttprov_executable
from tests.mosquitto_node import ADMIN_ACLS, MosquittoNode, call, killed, mosquitto_missing, node_only_conf
from tests.mqtt_clients import ACCEPTED, assert_ok, login, request_provisioning
from tests.test_serve import ServeProcess

# slow, the whole file: a private Mosquitto.
pytestmark = [
    pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing())),
    pytest.mark.skipif(
        not (shutil.which("jq") and shutil.which("openssl")), reason="the documented steps use jq and openssl"
    ),
    pytest.mark.slow,
]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "mosquitto.md"
STEP = re.compile(
    r"^[ \t]*<!-- docs-test: (?P<name>\S+) -->\n[ \t]*```[^\n]*\n(?P<body>.*?)\n[ \t]*```$",
    re.DOTALL | re.MULTILINE,
)
#: The steps the page documents, in order (a step lost in an edit fails here, not silently).
STEPS = [
    "passwords",
    "/etc/mosquitto/conf.d/mqttprov.conf",
    "/etc/mosquitto/provisioning.acl",
    "dynsec-init",
    "mqttprov.toml",
    "run",
]
#: Long-running commands of the 'run' step: started as services, each ready at this log line.
SERVICES = {
    ("mqttprov", "bridge", "run"): "bridge following the credential change feed",
    ("mqttprov", "worker"): "provisioning worker serving $share/mqttprov/provision/request",
}


def documented_steps() -> list[tuple[str, str]]:
    """``(name, text)`` of every marked block, unindented."""
    text = DOCS.read_text(encoding="utf-8")
    return [(match["name"], textwrap.dedent(match["body"]) + "\n") for match in STEP.finditer(text)]


class Shell:
    """One shell session across blocks: what a block exports, the next one sees."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env

    def run(self, script: str) -> str:
        """Run ``script`` with ``bash -eu`` (no terminal, no stdin); its output."""
        marker = "--- environment ---"
        result = subprocess.run(
            ["bash", "-euc", f"{script}\necho '{marker}'\nenv -0"],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            start_new_session=True,  # no controlling terminal: a prompt fails instead of waiting
        )
        assert result.returncode == 0, f"{script}\nfailed: {result.stdout}{result.stderr}"
        output, _, environment = result.stdout.partition(f"{marker}\n")
        self.env = dict(item.split("=", 1) for item in environment.split("\0") if "=" in item)
        return output


async def _service(shell: Shell, command: list[str]) -> ServeProcess:
    process = await asyncio.create_subprocess_exec(
        mqttprov_executable(),
        *command[1:],
        cwd=shell.cwd,
        env=shell.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    service = ServeProcess(process)
    await service.read_until(SERVICES[tuple(command)])
    return service


async def _run(shell: Shell, text: str) -> list[ServeProcess]:
    """The 'run' step: each command to its end, or started as a service until it is ready."""
    services: list[ServeProcess] = []
    try:
        for command in filter(None, (shlex.split(line, comments=True) for line in text.splitlines())):
            if tuple(command) in SERVICES:
                services.append(await _service(shell, command))
            else:
                await asyncio.to_thread(shell.run, shlex.join(command))
    except BaseException:
        await killed(services)
        raise
    return services


async def test_the_documented_steps_run_as_written(tmp_path: Path, sqlite_url: str) -> None:
    steps = documented_steps()
    assert [name for name, _ in steps] == STEPS
    device_port, provision_port = free_ports(2)
    root = tmp_path / "root"  # stands in for /: the packages make these folders
    for folder in (root / "etc/mosquitto/conf.d", root / "var/lib/mosquitto", tmp_path / "home"):
        folder.mkdir(parents=True)
    substitutions = [
        ("listener 8883", f"listener {device_port} 127.0.0.1"),
        ("listener 1883", f"listener {provision_port} 127.0.0.1"),
        ("8883", str(device_port)),
        ("/etc/mosquitto/", f"{root}/etc/mosquitto/"),
        ("/var/lib/mosquitto/", f"{root}/var/lib/mosquitto/"),
        ("mqtt.example.net", "127.0.0.1"),
        ("postgresql+asyncpg://mqttprov@db/mqttprov", sqlite_url),
        ("chown mosquitto:", f"chown {getpass.getuser()}:"),
    ]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # mqttprov installed
    shell = Shell(tmp_path, {**os.environ, "HOME": str(tmp_path / "home"), "PATH": path})
    node = MosquittoNode(tmp_path, device_port, provision_port)
    services: list[ServeProcess] = []
    try:
        for name, body in steps:
            text = functools.reduce(lambda done, pair: done.replace(*pair), substitutions, body)
            if name == "run":
                services += await _run(shell, text)
            elif name.startswith("/") or "." in name:
                target = root / name.lstrip("/") if name.startswith("/") else tmp_path / name
                if target.suffix == ".conf":
                    node.conf = target
                    text += node_only_conf(tmp_path)  # the docs name these additions
                target.write_text(text, encoding="utf-8")
            else:
                await asyncio.to_thread(shell.run, text)
            if name == "dynsec-init":
                await asyncio.to_thread(node.start)  # step 5: "Start (or restart) Mosquitto"

        # What the steps made: a device provisions and logs in, through the documented setup.
        mac = "aa:bb:cc:00:18:01"
        body = await call(request_provisioning, provision_port, mac, {"mac": mac})
        assert body is not None
        assert_ok(body)
        assert await call(login, device_port, body) == ACCEPTED
        for service in services:
            assert await service.stop(signal.SIGTERM) == 0
    finally:
        await killed(services)
        await asyncio.to_thread(node.stop)

    saved = json.loads((root / "var/lib/mosquitto/dynamic-security.json").read_text(encoding="utf-8"))
    admin = next(role for role in saved["roles"] if role["rolename"] == "admin")
    narrowed = {(acl["acltype"], acl["topic"], acl["allow"]) for acl in admin["acls"]}
    assert narrowed == {(acl["acltype"], acl["topic"], acl["allow"]) for acl in ADMIN_ACLS}
    logged = "\n".join(line for service in services for line in service.lines)
    assert " ERROR " not in logged
    assert "Traceback" not in logged
    for secret in ("MQTTPROV_EXTERNAL__ADMIN_PASSWORD", "MQTTPROV_EXTERNAL__WORKER_PASSWORD"):
        assert shell.env[secret] not in logged
    assert "does not contain" not in node.log
