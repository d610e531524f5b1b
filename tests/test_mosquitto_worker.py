"""The provisioning worker on Mosquitto: several workers, a failed hand-over, TLS, CLI errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from broker.external.mosquitto.bridge import DynsecBridge
from provisioning.external.link import ExternalBrokerError
from provisioning.registry import DeviceInfo
from tests.auth_support import hashed
from tests.helpers import free_port, mqttprov_executable, run_mqttprov, self_signed_cert, write_config
from tests.mosquitto_node import (
    KICK_WITHIN,
    call,
    killed,
    mosquitto_missing,
    mosquitto_node,
    mosquitto_stack,
    spy,
    stack_sections,
)
from tests.mqtt_clients import (
    ACCEPTED,
    NOT_AUTHORIZED,
    assert_error,
    assert_ok,
    device_session,
    login,
    request_provisioning,
)
from tests.test_serve import ServeProcess

# slow, the whole file: a private Mosquitto per test.
pytestmark = [
    pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing())),
    pytest.mark.slow,
]


async def test_two_workers_answer_each_request_once(tmp_path: Path, sqlite_url: str) -> None:
    async with mosquitto_stack(tmp_path, sqlite_url) as stack:
        await stack.start("worker-2")
        port = stack.node.provision_port
        macs = [f"aa:bb:cc:00:01:{n:02x}" for n in range(6)]
        sessions = [await call(spy, port, mac, f"provision/reply/{mac}") for mac in macs]
        try:
            for session, mac in zip(sessions, macs, strict=True):
                await call(session.publish, "provision/request", {"mac": mac})
            for session in sessions:
                reply = await call(session.next_reply, 0)
                assert reply is not None
                assert_ok(reply.json())
            # Both workers subscribed: without a shared subscription each request would be
            # answered twice (the second answer: RATE_LIMITED). A later exchange is the barrier.
            assert await call(stack.provision, "aa:bb:cc:00:01:ff") is not None
            assert [len(session.messages) for session in sessions] == [1] * len(macs)
        finally:
            for session in sessions:
                await call(session.close)


async def test_a_failed_hand_over_answers_internal_and_the_device_asks_again(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"provisioning": {"reissue_cooldown": 0}}
    async with mosquitto_stack(tmp_path, sqlite_url, options=options) as stack:
        issued = DynsecBridge.issued

        async def unreachable(
            self: DynsecBridge, device: DeviceInfo, password: str, password_hash: str
        ) -> None:
            monkeypatch.setattr(DynsecBridge, "issued", issued)  # fail once
            raise ExternalBrokerError("Mosquitto did not answer")

        monkeypatch.setattr(DynsecBridge, "issued", unreachable)
        mac = "aa:bb:cc:00:02:01"
        with await call(spy, stack.node.provision_port, mac, f"provision/reply/{mac}") as session:
            refused = await call(session.request, {"mac": mac})
            assert_error(refused, "INTERNAL", topic=f"provision/reply/{mac}")
            # Committed but never handed out: the next request is a reissue of the same device.
            device = await stack.devices.find_by_mac(mac)
            assert device is not None
            assert device.activated_at is None
            again = await call(session.request, {"mac": mac})
        assert again is not None
        body = again.json()
        assert assert_ok(body) == device.id
        assert await call(login, stack.node.device_port, body) == ACCEPTED


async def test_worker_and_bridge_over_tls(tmp_path: Path, sqlite_url: str) -> None:
    async with mosquitto_stack(tmp_path, sqlite_url, tls=True) as stack:
        assert stack.settings.external.broker.startswith("mqtts://")
        body = await call(stack.provision, "aa:bb:cc:00:03:01")
        assert body is not None
        assert_ok(body)
        with await call(device_session, stack.node.device_port, body) as session:
            await stack.devices.decommission(assert_ok(body))
            assert await call(session.disconnected.wait, KICK_WITHIN)
        # A CA that did not sign Mosquitto's certificate: one line, no traceback.
        other_ca, _ = self_signed_cert(tmp_path)
        result = await asyncio.to_thread(
            run_mqttprov,
            "bridge",
            "sync",
            "--config",
            str(stack.config),
            cwd=tmp_path,
            env={"MQTTPROV_EXTERNAL__CA_FILE": str(other_ca)},
        )
        assert result.returncode == 1
        assert result.stderr.startswith("error: cannot connect to mqtts://127.0.0.1:")
        assert "certificate verify failed" in result.stderr
        assert result.stderr.count("\n") == 1


async def test_rotation_outside_the_bridge_disables_the_account_on_mosquitto(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with mosquitto_stack(tmp_path, sqlite_url) as stack:
        added = await asyncio.to_thread(
            stack.cli, "bridge", "accounts", "add", "ops", "--allow", "publish devices/+/commands", "--json"
        )
        assert added.returncode == 0, added.stderr
        old = {
            "mqtt_client_id": "ops-1",
            "mqtt_username": "ops",
            "mqtt_password": json.loads(added.stdout)["password"],
        }
        with await call(
            spy, stack.node.device_port, "ops-1", username="ops", password=old["mqtt_password"]
        ) as ops:
            # Another tool (or `accounts rotate` with no [external] configured) writes the registry.
            await stack.accounts.rotate("ops", hashed("new-password-0009"))
            assert await call(ops.disconnected.wait, KICK_WITHIN)
        new = dict(old, mqtt_password="new-password-0009")
        # Mosquitto never learnt the new password; the old one is dead too.
        assert await call(login, stack.node.device_port, old) == NOT_AUTHORIZED
        assert await call(login, stack.node.device_port, new) == NOT_AUTHORIZED
        report = json.loads((await asyncio.to_thread(stack.cli, "bridge", "sync", "--json")).stdout)
        assert [(s["action"], s["username"]) for s in report["steps"]] == [("account_needs_rotate", "ops")]
        fixed = await asyncio.to_thread(stack.cli, "bridge", "accounts", "rotate", "ops", "--json")
        assert fixed.returncode == 0, fixed.stderr
        good = dict(old, mqtt_password=json.loads(fixed.stdout)["password"])
        assert await call(login, stack.node.device_port, good) == ACCEPTED


async def test_cli_errors_are_one_line(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path / "bare.toml", {"database": {"url": sqlite_url}})
    bad_url = await asyncio.to_thread(
        run_mqttprov, "bridge", "sync", "--broker", "http://x", "--config", str(config), cwd=tmp_path
    )
    assert bad_url.returncode == 2
    assert bad_url.stderr.startswith("error: invalid broker URL 'http://x'")
    assert bad_url.stderr.count("\n") == 1
    bare = await asyncio.to_thread(run_mqttprov, "bridge", "sync", "--config", str(config), cwd=tmp_path)
    assert bare.returncode == 1
    assert bare.stderr == "error: external.admin_password is not set (MQTTPROV_EXTERNAL__ADMIN_PASSWORD)\n"
    down = await asyncio.to_thread(
        run_mqttprov,
        "bridge",
        "sync",
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        "--config",
        str(config),
        cwd=tmp_path,
        env={"MQTTPROV_EXTERNAL__ADMIN_PASSWORD": "secret-0006"},
    )
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot connect to mqtt://127.0.0.1:")
    assert down.stderr.count("\n") == 1
    device_key = await asyncio.to_thread(
        run_mqttprov,
        "worker",
        "--config",
        str(config),
        cwd=tmp_path,
        env={
            "MQTTPROV_EXTERNAL__WORKER_PASSWORD": "secret-0007",
            "MQTTPROV_PROVISIONING__AUTH": "device_key",
            "MQTTPROV_PROVISIONING__DEVICE_KEY_SECRET": "secret-0008",
        },
    )
    assert device_key.returncode == 1
    assert device_key.stderr.startswith("error: provisioning.auth = 'device_key' cannot be enforced")
    assert device_key.stderr.count("\n") == 1
    shown = await asyncio.to_thread(
        run_mqttprov,
        "config",
        "show",
        "--json",
        "--config",
        str(config),
        cwd=tmp_path,
        env={"MQTTPROV_EXTERNAL__ADMIN_PASSWORD": "secret-0006"},
    )
    external = json.loads(shown.stdout)["external"]
    assert external["admin_password"] == "***"
    assert "secret-0006" not in shown.stdout


async def _spawn(config: Path, *args: str, env: dict[str, str] | None = None) -> ServeProcess:
    process = await asyncio.create_subprocess_exec(
        mqttprov_executable(),
        *args,
        "--config",
        str(config),
        cwd=config.parent,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return ServeProcess(process)


async def _stopped(process: ServeProcess) -> list[str]:
    """SIGTERM (or kill, if it still runs after a failure) and the lines it logged."""
    if process.process.returncode is None:
        try:
            assert await process.stop(signal.SIGTERM) == 0
        finally:
            await killed([process])
    return process.lines


WORKER_CLIENT_MISSING = (
    "ERROR   broker.external.mosquitto.bridge: no worker client 'mqttprov-worker' on Mosquitto and "
    "external.worker_password is not set: give this command the worker's password too "
    "(MQTTPROV_EXTERNAL__WORKER_PASSWORD) and start it again; until then `mqttprov worker` is "
    "refused (Not authorized)"
)


async def test_bridge_run_creates_the_worker_client_or_says_what_is_missing(
    tmp_path: Path, sqlite_url: str
) -> None:
    with mosquitto_node(tmp_path / "mosquitto") as node:
        sections = stack_sections(node, sqlite_url)
        password = str(sections["external"].pop("worker_password"))
        config = write_config(tmp_path / "mqttprov.toml", sections)
        migrated = await asyncio.to_thread(
            run_mqttprov, "db", "upgrade", "--config", str(config), cwd=tmp_path
        )
        assert migrated.returncode == 0, migrated.stderr
        worker_env = {"MQTTPROV_EXTERNAL__WORKER_PASSWORD": password}

        # The worker's password only in the worker's environment: the bridge says so, once.
        bridge = await _spawn(config, "bridge", "run")
        try:
            await bridge.read_until("bridge following the credential change feed")
        finally:
            lines = await _stopped(bridge)
        assert [line.split(" ", 2)[2] for line in lines if " ERROR " in line] == [WORKER_CLIENT_MISSING]
        refused = await asyncio.to_thread(
            run_mqttprov, "worker", "--config", str(config), cwd=tmp_path, env=worker_env
        )
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1].endswith(": Not authorized")

        # Given to the bridge too: it creates the client, and the worker logs in.
        bridge = await _spawn(config, "bridge", "run", env=worker_env)
        worker = None
        try:
            await bridge.read_until("created the worker client 'mqttprov-worker' on Mosquitto")
            await bridge.read_until("bridge following the credential change feed")
            worker = await _spawn(config, "worker", env=worker_env)
            await worker.read_until("provisioning worker serving $share/mqttprov/provision/request")
        finally:
            logged = await _stopped(bridge) + (await _stopped(worker) if worker else [])
        assert not [line for line in logged if " ERROR " in line]
        assert password not in "\n".join(logged)


async def test_bridge_and_worker_run_as_processes_until_signalled(tmp_path: Path, sqlite_url: str) -> None:
    with mosquitto_node(tmp_path / "mosquitto") as node:
        config = write_config(tmp_path / "mqttprov.toml", stack_sections(node, sqlite_url))
        migrated = await asyncio.to_thread(
            run_mqttprov, "db", "upgrade", "--config", str(config), cwd=tmp_path
        )
        assert migrated.returncode == 0, migrated.stderr
        early = await asyncio.to_thread(run_mqttprov, "worker", "--config", str(config), cwd=tmp_path)
        assert early.returncode == 1
        assert early.stderr.splitlines()[-1].endswith(": Not authorized")  # no worker client yet
        running = [await _spawn(config, "bridge", "run")]
        try:
            # The bridge creates the worker's client: the worker starts after it.
            await running[0].read_until("bridge following the credential change feed")
            running.append(await _spawn(config, "worker"))
            await running[1].read_until("provisioning worker serving $share/mqttprov/provision/request")
            mac = "aa:bb:cc:00:04:01"
            body = await call(request_provisioning, node.provision_port, mac, {"mac": mac})
            assert body is not None
            assert_ok(body)
            with await call(device_session, node.device_port, body) as session:
                retired = await asyncio.to_thread(
                    run_mqttprov, "devices", "decommission", mac, "--config", str(config), cwd=tmp_path
                )
                assert retired.returncode == 0, retired.stderr
                assert await call(session.disconnected.wait, KICK_WITHIN)
            for process in running:  # a hang-up (a closed terminal, kill -HUP) ends neither
                process.process.send_signal(signal.SIGHUP)
                await process.read_until("received SIGHUP: nothing reloaded")
            second = "aa:bb:cc:00:04:02"
            assert_ok(await call(request_provisioning, node.provision_port, second, {"mac": second}))
            for process in running:
                assert process.process.returncode is None
                assert await process.stop(signal.SIGTERM) == 0
        finally:
            await killed(running)
    logged = "\n".join(running[0].lines + running[1].lines)
    assert "Traceback" not in logged
    assert body["mqtt_password"] not in logged
    assert f"revoked {body['mqtt_username']} on Mosquitto (delete)" in logged


async def test_worker_and_bridge_survive_a_mosquitto_restart(tmp_path: Path, sqlite_url: str) -> None:
    async with mosquitto_stack(tmp_path, sqlite_url) as stack:
        await asyncio.to_thread(stack.node.stop)
        await asyncio.to_thread(stack.node.start)  # same ports, same dynamic-security file
        # paho reconnects (1 s back-off at first) and the worker subscribes again; until then a
        # request is lost, and the device asks again, as firmware does after a silent broker.
        body = None
        for _ in range(5):
            body = await call(
                request_provisioning,
                stack.node.provision_port,
                "aa:bb:cc:00:05:01",
                {"mac": "aa:bb:cc:00:05:01"},
                timeout=3.0,
            )
            if body is not None:
                break
        assert body is not None
        device_id = assert_ok(body)
        with await call(device_session, stack.node.device_port, body) as session:
            await stack.devices.decommission(device_id)
            assert await call(session.disconnected.wait, KICK_WITHIN)


@pytest.mark.postgres
async def test_provisioning_and_revocation_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    async with mosquitto_stack(tmp_path, postgres_url) as stack:
        body = await call(stack.provision, "aa:bb:cc:00:06:01")
        assert body is not None
        device_id = assert_ok(body)
        with await call(device_session, stack.node.device_port, body) as session:
            await stack.devices.reset(device_id)
            assert await call(session.disconnected.wait, KICK_WITHIN)
        assert await call(login, stack.node.device_port, body) == NOT_AUTHORIZED
