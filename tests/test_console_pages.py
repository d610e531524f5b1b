"""The console's pages over HTTP: what each shows and what each change does to the registry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from provisioning.registry import DeviceStatus
from tests.api_support import Api, api_settings, running_api
from tests.console_support import add_operator, logged_in

MACS = ["02:00:00:00:c0:01", "02:00:00:00:c0:02", "02:00:00:00:d0:03"]


@pytest.fixture
async def api(sqlite_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(sqlite_url, provisioning={"mode": "approval"})) as running:
        await add_operator(running.server.services)
        yield running


async def test_the_overview_counts_devices_and_todays_enrolments(api: Api) -> None:
    await logged_in(api.client)
    await api.server.services.registry.add_allowed(MACS[0])
    enrolled = await api.client.post("/api/v1/provision", json={"mac": MACS[1]})
    assert enrolled.status_code == 202, enrolled.text  # approval mode: pending
    await api.server.services.registry.approve((await api.server.services.registry.resolve(MACS[1])).id)
    assert (await api.client.post("/api/v1/provision", json={"mac": MACS[1]})).status_code == 200

    figures = (await api.client.get("/?fragment=1")).text
    assert '<span class="figure" id="total-devices">2</span>' in figures
    assert '<span class="figure" id="enrolled-today">1</span>' in figures
    assert '<td class="num" id="count-registered">1</td>' in figures
    assert "<svg" in figures


@pytest.mark.parametrize(
    "search", ["02:00:00:00:c0", "02-00-00-00-C0", "0200.0000.c0", "020000", "02:00:00:00:C0:02"]
)
async def test_devices_are_found_by_a_mac_in_any_notation(api: Api, search: str) -> None:
    await logged_in(api.client)
    for mac in MACS:
        await api.server.services.registry.add_allowed(mac)
    found = await api.client.get("/devices", params={"q": search})
    assert found.status_code == 200
    shown = [mac for mac in MACS if f'data-mac="{mac}"' in found.text]
    expected = [
        m
        for m in MACS
        if m.replace(":", "").startswith(search.replace(":", "").replace("-", "").replace(".", "").lower())
    ]
    assert shown == expected


async def test_devices_are_filtered_by_status_and_label_and_paged(api: Api) -> None:
    await logged_in(api.client)
    registry = api.server.services.registry
    for index in range(55):
        device = await registry.add_allowed(f"02:00:00:01:00:{index:02x}")
        if index % 2:
            await registry.set_labels(device.id, {"site": "berlin"})
    await registry.reject((await registry.resolve("02:00:00:01:00:00")).id)

    berlin = await api.client.get("/devices", params={"label": "site=berlin"})
    assert "27 devices" in berlin.text
    rejected = await api.client.get("/devices", params={"status": "rejected"})
    assert "1 device," in rejected.text
    first = await api.client.get("/devices")
    assert "55 devices, 1-50 shown" in first.text
    assert 'rel="next"' in first.text
    second = await api.client.get("/devices", params={"offset": 50})
    assert "51-55 shown" in second.text
    bad = await api.client.get("/devices", params={"label": "no equals sign"})
    assert bad.status_code == 400
    assert "key=value" in bad.text


async def test_a_device_page_and_its_changes(api: Api) -> None:
    token = await logged_in(api.client)
    registry = api.server.services.registry
    device = await registry.add_allowed(MACS[0], note="bench 3")
    shown = await api.client.get(f"/devices/{device.id}")
    assert shown.status_code == 200
    assert "bench 3" in shown.text
    assert "added" in shown.text  # the timeline

    wrong = await api.client.post(
        f"/devices/{device.id}/decommission", data={"csrf": token, "confirm": MACS[1]}
    )
    assert wrong.status_code == 400
    assert "Not decommissioned" in wrong.text
    assert (await registry.get(device.id)).status is DeviceStatus.APPROVED

    right = await api.client.post(
        f"/devices/{device.id}/decommission",
        data={"csrf": token, "confirm": MACS[0].upper().replace(":", "-")},
    )
    assert right.status_code == 303
    assert right.headers["location"] == f"/devices/{device.id}?done=decommissioned"
    assert (await registry.get(device.id)).status is DeviceStatus.DECOMMISSIONED
    after = await api.client.get(right.headers["location"])
    assert "Decommissioned: its sessions are ended" in after.text

    again = await api.client.post(f"/devices/{device.id}/reset", data={"csrf": token})
    assert again.status_code == 409  # a decommissioned device cannot be reset: the registry says why

    gone = await api.client.post(f"/devices/{device.id}/delete", data={"csrf": token})
    assert gone.headers["location"] == "/devices?done=deleted"
    assert (await api.client.get(f"/devices/{device.id}")).status_code == 404
    forged = await api.client.post(f"/devices/{device.id}/delete", data={})
    assert forged.status_code == 403


async def test_the_approval_queue_approves_and_rejects_one_or_many(api: Api) -> None:
    token = await logged_in(api.client)
    registry = api.server.services.registry
    for mac in MACS:
        assert (await api.client.post("/api/v1/provision", json={"mac": mac})).status_code == 202
    waiting = await api.client.get("/approvals?fragment=1")
    assert "3 waiting" in waiting.text
    ids = [str((await registry.resolve(mac)).id) for mac in MACS]

    many = await api.client.post("/approvals", data={"csrf": token, "action": "approve", "device": ids[:2]})
    assert many.status_code == 303
    assert "2 approved" in (await api.client.get(many.headers["location"])).text.lower()
    one = await api.client.post(
        "/approvals", data={"csrf": token, "only": f"reject:{ids[2]}", "device": ids[:1]}
    )
    assert (await api.client.get(one.headers["location"])).status_code == 200
    statuses = [(await registry.resolve(mac)).status for mac in MACS]
    assert statuses == [DeviceStatus.APPROVED, DeviceStatus.APPROVED, DeviceStatus.REJECTED]
    assert "Nobody is waiting." in (await api.client.get("/approvals")).text
    stale = await api.client.post("/approvals", data={"csrf": token, "action": "approve", "device": ids[2:]})
    assert (await api.client.get(stale.headers["location"])).status_code == 200
    assert (await registry.resolve(MACS[2])).status is DeviceStatus.APPROVED  # rejected may be approved


async def test_service_accounts_are_added_rotated_and_removed(api: Api) -> None:
    token = await logged_in(api.client)
    rules = "subscribe devices/+/telemetry\r\npublish devices/+/commands\r\n"
    added = await api.client.post("/accounts", data={"csrf": token, "name": "telemetry", "rules": rules})
    assert added.status_code == 201
    assert 'data-copy="secret-value"' in added.text
    password = added.text.split('<code id="secret-value">', 1)[1].split("<", 1)[0]
    accounts = api.server.services.accounts
    found = await accounts.find("telemetry")
    assert found is not None
    assert await api.server.services.hasher.verify(password, found.password_hash)
    assert [str(rule) for rule in found.account.allow] == [
        "subscribe devices/+/telemetry",
        "publish devices/+/commands",
    ]
    assert password not in (await api.client.get("/accounts")).text  # shown once

    bad = await api.client.post("/accounts", data={"csrf": token, "name": "other", "rules": "listen #"})
    assert bad.status_code == 400
    assert "listen #" in bad.text  # the form keeps what was typed

    rotated = await api.client.post("/accounts/telemetry/rotate", data={"csrf": token})
    new_password = rotated.text.split('<code id="secret-value">', 1)[1].split("<", 1)[0]
    assert new_password != password
    removed = await api.client.post("/accounts/telemetry/remove", data={"csrf": token})
    assert removed.headers["location"] == "/accounts?done=removed"
    assert await accounts.find("telemetry") is None


async def test_api_tokens_are_created_listed_and_revoked(api: Api) -> None:
    token = await logged_in(api.client)
    created = await api.client.post(
        "/tokens", data={"csrf": token, "name": "factory", "scope": ["read", "write"]}
    )
    assert created.status_code == 201
    secret = created.text.split('<code id="secret-value">', 1)[1].split("<", 1)[0]
    works = await api.client.get("/api/v1/devices", headers={"Authorization": f"Bearer {secret}"})
    assert works.status_code == 200
    listed = await api.client.get("/tokens")
    assert 'data-token="factory"' in listed.text
    assert secret not in listed.text
    none = await api.client.post("/tokens", data={"csrf": token, "name": "empty"})
    assert none.status_code == 400
    (info,) = await api.server.services.tokens.list()
    revoked = await api.client.post(f"/tokens/{info.id}/revoke", data={"csrf": token})
    assert revoked.headers["location"] == "/tokens?done=revoked"
    refused = await api.client.get("/api/v1/devices", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401


async def test_the_search_form_as_a_browser_sends_it(api: Api) -> None:
    await logged_in(api.client)
    await api.server.services.registry.add_allowed(MACS[0])
    found = await api.client.get("/devices", params={"q": "02-00", "status": "", "label": ""})
    assert found.status_code == 200
    assert "1 device," in found.text
    unknown = await api.client.get("/devices", params={"status": "sleeping"})
    assert unknown.status_code == 400
