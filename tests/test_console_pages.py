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
