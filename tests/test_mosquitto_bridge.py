"""Provisioning and logins through a real private Mosquitto with dynamic security.

The worker and the bridge run on the test's event loop against a Mosquitto started for the
test (tests/mosquitto_node.py); devices and spies are real MQTT clients on their own threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from broker.external.mosquitto.dynsec import DynsecClient
from broker.external.mosquitto.layout import WORKER_ROLE
from broker.external.mosquitto.runtime import open_bridge
from provisioning.external.link import MqttLink, parse_broker_url
from provisioning.registry import DeviceStatus
from tests.auth_support import hashed
from tests.helpers import run_mqttprov
from tests.mosquitto_node import (
    ADMIN,
    ADMIN_PASSWORD,
    KICK_WITHIN,
    WORKER,
    WORKER_PASSWORD,
    Stack,
    call,
    mosquitto_missing,
    mosquitto_stack,
    spy,
)
from tests.mqtt_clients import (
    ACCEPTED,
    NOT_AUTHORIZED,
    SUBACK_FAILURE,
    assert_ok,
    device_session,
    login,
    request_provisioning,
)

# slow, the whole file: a private Mosquitto per test.
pytestmark = [
    pytest.mark.skipif(mosquitto_missing() is not None, reason=str(mosquitto_missing())),
    pytest.mark.slow,
]


@pytest.fixture
async def stack(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Stack]:
    """Mosquitto, a migrated registry, the bridge and one worker, all running."""
    async with mosquitto_stack(tmp_path, sqlite_url) as running:
        yield running


# -- provisioning ---------------------------------------------------------------------------------


async def test_provisioning_through_mosquitto_reaches_only_the_asking_session(stack: Stack) -> None:
    port = stack.node.provision_port
    with await call(spy, port, "watcher", "#", "provision/reply/#", "provision/reply/+") as watcher:
        body = await call(stack.provision, "aa:bb:cc:00:00:01")
        assert body is not None
        device_id = assert_ok(body)
        assert body["mqtt_port"] == stack.node.device_port
        # A second exchange completes after the first: the watcher had every chance to get both.
        second = await call(stack.provision, "aa:bb:cc:00:00:02")
        assert second is not None
        assert_ok(second)
        assert watcher.messages == []
    device = await stack.devices.get(device_id)
    assert device.status is DeviceStatus.REGISTERED
    # The credentials work on the device listener, bound to the client id, in their namespace.
    with await call(device_session, stack.node.device_port, body) as session:
        assert await call(session.roundtrip, f"{body['topic_prefix']}telemetry", b"21.5")
    assert await call(login, stack.node.device_port, body, password="wrong-password-0000") == NOT_AUTHORIZED
    wrong_id = dict(body, mqtt_client_id="someone-else")
    assert await call(login, stack.node.device_port, wrong_id) == NOT_AUTHORIZED


async def test_a_request_naming_another_mac_is_answered_to_that_mac_only(stack: Stack) -> None:
    port = stack.node.provision_port
    victim_mac, asker_mac = "aa:bb:cc:00:00:11", "aa:bb:cc:00:00:12"
    with (
        await call(spy, port, victim_mac, f"provision/reply/{victim_mac}") as victim,
        await call(
            spy, port, asker_mac, f"provision/reply/{victim_mac}", f"provision/reply/{asker_mac}"
        ) as asker,
    ):
        await call(asker.publish, "provision/request", {"mac": victim_mac})
        reply = await call(victim.next_reply, 0)
        assert reply is not None
        assert reply.json()["status"] == "ok"
        # The asker held a subscription to the victim's reply topic: Mosquitto still withheld it.
        own = await call(stack.provision, "aa:bb:cc:00:00:13")
        assert own is not None
        assert asker.messages == []


async def test_client_id_notation_must_match_the_reply_topic(stack: Stack) -> None:
    port = stack.node.provision_port
    mac = "AA-BB-CC-00-00-21"
    body = await call(request_provisioning, port, mac, {"mac": mac})
    assert body is not None
    assert_ok(body)
    # Another notation of the same MAC in the reply topic: %c is compared literally.
    with await call(spy, port, "aa:bb:cc:00:00:22", "provision/reply/AA:BB:CC:00:00:22") as other:
        await call(other.publish, "provision/request", {"mac": "AA:BB:CC:00:00:22"})
        done = await call(stack.provision, "aa:bb:cc:00:00:23")
        assert done is not None
        assert other.messages == []


async def test_service_clients_cannot_read_provisioning(stack: Stack) -> None:
    port = stack.node.device_port
    with await call(spy, port, "mqttprov-worker-spy", username=WORKER, password=WORKER_PASSWORD) as worker:
        assert await call(worker.subscribe, "provision/reply/#") == SUBACK_FAILURE
        assert await call(worker.subscribe, "#") == SUBACK_FAILURE
    assert (
        await call(
            login,
            stack.node.provision_port,
            {"mqtt_client_id": "x", "mqtt_username": WORKER, "mqtt_password": "anything"},
        )
        == ACCEPTED
    )  # the provisioning listener checks no password: it grants only the %c patterns


async def test_the_provisioning_acl_file_uses_plain_topic_lines(stack: Stack) -> None:
    port = stack.node.provision_port
    victim_mac, spy_mac = "aa:bb:cc:00:00:71", "aa:bb:cc:00:00:72"
    with await call(spy, port, spy_mac, "#", f"provision/reply/{victim_mac}") as snoop:
        # Anonymous, and as 'provision' (any password: the listener checks none), requests pass.
        own = await call(request_provisioning, port, spy_mac, {"mac": spy_mac})
        assert own is not None
        assert_ok(own)
        body = await call(
            request_provisioning, port, victim_mac, {"mac": victim_mac}, username="provision", password="x"
        )
        assert body is not None
        assert_ok(body)
        # The spy may publish requests, not read another MAC's reply.
        assert snoop.messages == []
    # Another username may not publish requests: its request never reaches the worker.
    with await call(spy, port, "aa:bb:cc:00:00:73", username="intruder", password="x") as other:
        await call(other.publish, "provision/request", {"mac": "aa:bb:cc:00:00:73"})
        assert await call(stack.provision, "aa:bb:cc:00:00:74") is not None  # the barrier
    assert await stack.devices.find_by_mac("aa:bb:cc:00:00:73") is None
    # No 'pattern' without %c/%u, so none of Mosquitto's warnings about one.
    assert "does not contain" not in stack.node.log


# -- logins and the ACL ---------------------------------------------------------------------------


async def test_a_device_stays_in_its_own_namespace(stack: Stack) -> None:
    first = await call(stack.provision, "aa:bb:cc:00:00:31")
    second = await call(stack.provision, "aa:bb:cc:00:00:32")
    assert first is not None
    assert second is not None
    port = stack.node.device_port
    with await call(device_session, port, first) as a, await call(device_session, port, second) as b:
        assert await call(a.subscribe, f"{second['topic_prefix']}#") == SUBACK_FAILURE
        assert await call(a.subscribe, "devices/#") == SUBACK_FAILURE
        assert await call(a.subscribe, "provision/reply/#") == SUBACK_FAILURE
        await call(a.publish, f"{second['topic_prefix']}commands", b"intrude")
        assert await call(b.roundtrip, f"{second['topic_prefix']}state", b"ok")
        assert all(m.payload != b"intrude" for m in b.messages)


async def test_decommission_and_reset_throw_the_session_off(stack: Stack) -> None:
    body = await call(stack.provision, "aa:bb:cc:00:00:41")
    assert body is not None
    device_id = assert_ok(body)
    port = stack.node.device_port
    with await call(device_session, port, body) as session:
        await stack.devices.reset(device_id)
        assert await call(session.disconnected.wait, KICK_WITHIN)
    assert await call(login, port, body) == NOT_AUTHORIZED
    # A reset device enrols again (the firmware rule: a refused login means provision again).
    again = await call(stack.provision, "aa:bb:cc:00:00:41")
    assert again is not None
    assert assert_ok(again) == device_id
    with await call(device_session, port, again) as session:
        await stack.devices.decommission(device_id)
        assert await call(session.disconnected.wait, KICK_WITHIN)
    assert await call(login, port, again) == NOT_AUTHORIZED
    refused = await call(stack.provision, "aa:bb:cc:00:00:41")
    assert refused is not None
    assert refused["error_code"] == "DECOMMISSIONED"


# -- sync after an outage -------------------------------------------------------------------------


@asynccontextmanager
async def _admin(stack: Stack) -> AsyncIterator[DynsecClient]:
    address = parse_broker_url(stack.settings.external.broker)
    async with MqttLink(address, client_id="test-admin", username=ADMIN, password=ADMIN_PASSWORD) as link:
        dynsec = DynsecClient(link)
        await dynsec.start()
        try:
            yield dynsec
        finally:
            await dynsec.stop()


async def test_sync_repairs_what_happened_while_the_bridge_was_down(stack: Stack) -> None:
    port = stack.node.device_port
    retired = await call(stack.provision, "aa:bb:cc:00:00:51")
    lost = await call(stack.provision, "aa:bb:cc:00:00:52")
    assert retired is not None
    assert lost is not None
    await stack.stop("bridge")
    retired_id = assert_ok(retired)
    await stack.devices.decommission(retired_id)
    async with _admin(stack) as dynsec:
        await dynsec.delete_client(lost["mqtt_username"])
    # Registered behind Mosquitto's back (say, imported from the embedded broker's database).
    imported = await stack.devices.create_device(
        "aa:bb:cc:00:00:53", status=DeviceStatus.OFFLINE, password_hash=hashed("imported-password-0005")
    )
    assert await call(login, port, retired) == ACCEPTED  # the gap sync closes

    dry = await asyncio.to_thread(stack.cli, "bridge", "sync", "--dry-run", "--grace", "0", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    steps = {(s["action"], s["username"]) for s in planned["steps"]}
    assert steps == {
        ("disable_client", retired["mqtt_username"]),
        ("reset_device", lost["mqtt_username"]),
        ("reset_device", imported.mqtt_username),
    }
    assert await call(login, port, retired) == ACCEPTED  # a dry run changes nothing

    done = await asyncio.to_thread(stack.cli, "bridge", "sync", "--grace", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert {(s["action"], s["username"]) for s in json.loads(done.stdout)["steps"]} == steps
    assert await call(login, port, retired) == NOT_AUTHORIZED
    for device in (await stack.devices.resolve(lost["mqtt_username"]), imported):
        record = await stack.devices.find_credentials_by_username(device.mqtt_username)
        assert record is not None
        assert record.password_hash is None
    # The lost device re-enrols and is known to Mosquitto again.
    again = await call(stack.provision, "aa:bb:cc:00:00:52")
    assert again is not None
    assert_ok(again)
    assert await call(login, port, again) == ACCEPTED
    clean = await asyncio.to_thread(stack.cli, "bridge", "sync", "--grace", "0")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("checked 1 devices, 0 accounts, 4 Mosquitto clients; did 0 steps")


async def test_a_starting_bridge_disables_what_was_revoked_while_it_was_down(stack: Stack) -> None:
    port = stack.node.device_port
    retired = await call(stack.provision, "aa:bb:cc:00:00:61")
    lost = await call(stack.provision, "aa:bb:cc:00:00:62")
    kept = await call(stack.provision, "aa:bb:cc:00:00:63")
    assert retired is not None
    assert lost is not None
    assert kept is not None
    await stack.stop("bridge")
    await stack.devices.decommission(assert_ok(retired))
    async with _admin(stack) as dynsec:
        await dynsec.delete_client(lost["mqtt_username"])
    assert await call(login, port, retired) == ACCEPTED  # nobody has told Mosquitto yet

    await stack.start("bridge")
    assert await call(login, port, retired) == NOT_AUTHORIZED
    assert await call(login, port, kept) == ACCEPTED
    # Taking access away is safe to do unasked; resetting a device Mosquitto lost is not (it must
    # enrol again): that stays `bridge sync`.
    record = await stack.devices.find_credentials_by_username(lost["mqtt_username"])
    assert record is not None
    assert record.password_hash is not None


# -- service accounts -----------------------------------------------------------------------------


async def test_service_accounts_on_mosquitto(stack: Stack) -> None:
    refused = await asyncio.to_thread(
        stack.cli, "bridge", "accounts", "add", "snoop", "--allow", "subscribe #"
    )
    assert refused.returncode == 2
    assert "overlaps provision/" in refused.stderr
    assert await stack.accounts.find("snoop") is None

    added = await asyncio.to_thread(
        stack.cli, "bridge", "accounts", "add", "reader", "--allow", "subscribe devices/+/telemetry", "--json"
    )
    assert added.returncode == 0, added.stderr
    password = json.loads(added.stdout)["password"]
    body = await call(stack.provision, "aa:bb:cc:00:00:61")
    assert body is not None
    port = stack.node.device_port
    telemetry = f"{body['topic_prefix']}telemetry"
    with (
        await call(
            spy, port, "reader-1", "devices/+/telemetry", username="reader", password=password
        ) as reader,
        await call(device_session, port, body) as device,
    ):
        assert await call(reader.subscribe, "#") == SUBACK_FAILURE
        await call(device.publish, telemetry, b"22.0")
        assert await call(reader.wait_for, lambda m: m.topic == telemetry) is not None

        rotated = await asyncio.to_thread(stack.cli, "bridge", "accounts", "rotate", "reader", "--json")
        assert rotated.returncode == 0, rotated.stderr
        new_password = json.loads(rotated.stdout)["password"]
        assert await call(reader.disconnected.wait, KICK_WITHIN)
    account = {"mqtt_client_id": "reader-2", "mqtt_username": "reader", "mqtt_password": new_password}
    assert await call(login, port, account) == ACCEPTED
    assert await call(login, port, account, password=password) == NOT_AUTHORIZED

    with await call(spy, port, "reader-3", username="reader", password=new_password) as reader:
        await stack.accounts.remove("reader")
        assert await call(reader.disconnected.wait, KICK_WITHIN)
    assert await call(login, port, account) == NOT_AUTHORIZED


async def test_plain_accounts_commands_act_on_mosquitto_too(stack: Stack) -> None:
    port = stack.node.device_port
    refused = await asyncio.to_thread(stack.cli, "accounts", "add", "snoop", "--allow", "subscribe #")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: rule subscribe # overlaps provision/")
    no_admin = await asyncio.to_thread(
        run_mqttprov,
        *("accounts", "add", "ops", "--allow", "publish devices/+/commands", "--config", str(stack.config)),
        cwd=stack.config.parent,
        env={"MQTTPROV_EXTERNAL__ADMIN_PASSWORD": ""},
    )
    assert no_admin.returncode == 1
    assert (
        no_admin.stderr == "error: external.admin_password is not set (MQTTPROV_EXTERNAL__ADMIN_PASSWORD)\n"
    )
    for name in ("snoop", "ops"):
        assert await stack.accounts.find(name) is None  # refused before anything was written

    added = await asyncio.to_thread(
        stack.cli, "accounts", "add", "ops", "--allow", "publish devices/+/commands", "--json"
    )
    assert added.returncode == 0, added.stderr
    first = {
        "mqtt_client_id": "ops-1",
        "mqtt_username": "ops",
        "mqtt_password": json.loads(added.stdout)["password"],
    }
    with await call(spy, port, "ops-1", username="ops", password=first["mqtt_password"]) as ops:
        rotated = await asyncio.to_thread(stack.cli, "accounts", "rotate", "ops", "--json")
        assert rotated.returncode == 0, rotated.stderr
        assert await call(ops.disconnected.wait, KICK_WITHIN)
    second = dict(first, mqtt_password=json.loads(rotated.stdout)["password"])
    assert await call(login, port, first) == NOT_AUTHORIZED
    assert await call(login, port, second) == ACCEPTED
    # Removal: the registry, then the running bridge deletes the client (it kicks the session).
    with await call(spy, port, "ops-2", username="ops", password=second["mqtt_password"]) as ops:
        removed = await asyncio.to_thread(stack.cli, "accounts", "remove", "ops")
        assert removed.returncode == 0, removed.stderr
        assert "`mqttprov bridge run` deletes its client" in removed.stdout
        assert await call(ops.disconnected.wait, KICK_WITHIN)
    assert await call(login, port, second) == NOT_AUTHORIZED


async def test_a_changed_worker_role_is_edited_in_place(stack: Stack) -> None:
    external = stack.settings.external.model_copy(update={"shared_group": "fleet-b"})
    settings = stack.settings.model_copy(update={"external": external})
    async with open_bridge(settings, parse_broker_url(external.broker)) as bridge:
        await bridge.ensure_layout()
        worker = await bridge.dynsec.get_client(WORKER)
        acls = await bridge.dynsec.get_role_acls(WORKER_ROLE)
    assert worker is not None
    assert [role.rolename for role in worker.roles] == [WORKER_ROLE]
    assert acls is not None
    shared = {acl.topic for acl in acls if acl.topic.startswith("$share/")}
    assert shared == {"$share/fleet-b/provision/request"}


async def test_the_bridge_gives_the_worker_client_its_role_and_says_when_it_is_disabled(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    async with _admin(stack) as dynsec:
        await dynsec.call("removeClientRole", username=WORKER, rolename=WORKER_ROLE)
        await dynsec.disable_client(WORKER)
    caplog.set_level(logging.INFO, logger="broker.external.mosquitto.bridge")
    async with open_bridge(stack.settings, parse_broker_url(stack.settings.external.broker)) as bridge:
        await bridge.ensure_layout()
        worker = await bridge.dynsec.get_client(WORKER)
    assert worker is not None
    assert [role.rolename for role in worker.roles] == [WORKER_ROLE]
    assert worker.disabled  # an operator's doing: left to them, and said
    said = (
        f"the worker client {WORKER!r} is disabled on Mosquitto: `mqttprov worker` is refused "
        f"(Not authorized) until it is enabled (mosquitto_ctrl ... dynsec enableClient {WORKER})"
    )
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [said]
