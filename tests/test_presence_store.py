"""Presence batches against a real registry (SQLite and PostgreSQL): statuses and folded logins."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

from auth_plugin.presence import PresenceRecorder
from broker.core import end_background
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


class _SlowStore(PresenceStore):
    """The fault: a database that takes its time with a batch, until ``release`` is set."""

    def __init__(self, registry: DeviceRegistry) -> None:
        super().__init__(registry.engine)
        self.writing = asyncio.Event()
        self.release = asyncio.Event()

    async def record(self, latest: Mapping[uuid.UUID, Presence], logins: Mapping[uuid.UUID, int]) -> None:
        self.writing.set()
        await self.release.wait()
        await super().record(latest, logins)


async def test_stopping_the_writer_never_cuts_off_the_batch_it_is_writing(registry: DeviceRegistry) -> None:
    device = await make_device(registry, "02:00:00:00:0b:51")
    store = _SlowStore(registry)
    recorder = PresenceRecorder(store, interval=0.05)
    running = asyncio.create_task(recorder.run())
    recorder.online(device.id)
    await asyncio.wait_for(store.writing.wait(), 5.0)  # the batch is on its way to the database
    stopping = asyncio.create_task(end_background(running, recorder.request_stop))
    store.release.set()
    await asyncio.wait_for(stopping, 10.0)

    assert not running.cancelled()
    assert recorder.batches_written == 1
    assert (await registry.get(device.id)).status is DeviceStatus.ONLINE
