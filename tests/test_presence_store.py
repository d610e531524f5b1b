"""Presence batches against a real registry (SQLite and PostgreSQL): statuses and folded logins."""

from __future__ import annotations

import uuid

from provisioning.registry import DeviceRegistry, DeviceStatus
from provisioning.registry.models import utcnow
from provisioning.registry.presence import Presence, PresenceStore
from tests.auth_support import make_device


async def _logins(registry: DeviceRegistry, device_id: uuid.UUID) -> list[int]:
    return [e.count for e in await registry.events(device_id, limit=50) if e.kind == "login"]


async def test_one_batch_folds_the_logins_of_many_devices_into_one_row_each(registry: DeviceRegistry) -> None:
    store = PresenceStore(registry.engine)
    devices = [await make_device(registry, f"02:00:00:00:0b:{i:02x}") for i in range(1, 31)]
    first = {d.id: 1 + i % 3 for i, d in enumerate(devices)}

    await store.record({d.id: Presence(online=True, at=utcnow()) for d in devices}, first)
    await store.record({}, {devices[0].id: 5, devices[1].id: 1})

    assert await _logins(registry, devices[0].id) == [first[devices[0].id] + 5]
    assert await _logins(registry, devices[1].id) == [first[devices[1].id] + 1]
    for device in devices[2:]:
        assert await _logins(registry, device.id) == [first[device.id]]
    page = await registry.list_devices(status=DeviceStatus.ONLINE)
    assert page.total == len(devices)


async def test_presence_never_revives_a_device_that_is_not_active(registry: DeviceRegistry) -> None:
    store = PresenceStore(registry.engine)
    active = await make_device(registry, "02:00:00:00:0b:41")
    gone = await make_device(registry, "02:00:00:00:0b:42")
    await registry.decommission(gone.id)

    online = Presence(online=True, at=utcnow())
    await store.record({active.id: online, gone.id: online}, {})

    assert (await registry.get(active.id)).status is DeviceStatus.ONLINE
    assert (await registry.get(gone.id)).status is DeviceStatus.DECOMMISSIONED
