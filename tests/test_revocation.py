"""The revocation follower against a real registry: in-process changes act at once, and a session
that goes live just after its credential was dropped is checked again and thrown off."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from auth_plugin.cache import VerifiedCache
from auth_plugin.principals import DevicePrincipal, Principal, credential_tag
from auth_plugin.revocation import Revoker
from provisioning.registry import DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from tests.auth_support import PASSWORD, make_device


class Sessions:
    """A broker's live-session table as the follower sees it (a plain fake, no broker needed)."""

    def __init__(self) -> None:
        self.live: dict[str, Principal] = {}
        self.kicked: asyncio.Queue[str] = asyncio.Queue()

    def live_principals(self) -> Iterable[tuple[str, Principal]]:
        return list(self.live.items())

    async def kick(self, client_id: str, reason: str) -> bool:
        if self.live.pop(client_id, None) is None:
            return False
        self.kicked.put_nowait(client_id)
        return True


@pytest.fixture
def accounts(registry: DeviceRegistry) -> AccountRegistry:
    return AccountRegistry(registry.engine)


async def _principal(registry: DeviceRegistry, mac: str) -> DevicePrincipal:
    device = await make_device(registry, mac)
    record = await registry.find_credentials_by_username(device.mqtt_username)
    assert record is not None
    assert record.password_hash is not None
    tag = credential_tag(record.password_hash)
    return DevicePrincipal(device.id, device.mqtt_username, device.mac, f"devices/{device.id}/#", tag)


async def test_a_change_made_in_this_process_drops_the_cache_entry_before_the_call_returns(
    registry: DeviceRegistry, accounts: AccountRegistry
) -> None:
    cache = VerifiedCache()
    Revoker(registry, accounts, cache, Sessions())
    principal = await _principal(registry, "02:00:00:00:0a:01")
    cache.remember(principal.username, principal.tag, PASSWORD)
    cache.accept(principal.username, principal.tag, principal)

    await registry.decommission(principal.device_id)

    assert cache.principal(principal.username, PASSWORD) is None
    assert not cache.holds(principal.username, principal.tag)


async def test_a_session_that_goes_live_after_its_credential_was_dropped_is_kicked(
    registry: DeviceRegistry, accounts: AccountRegistry
) -> None:
    cache, sessions = VerifiedCache(), Sessions()
    revoker = Revoker(registry, accounts, cache, sessions)
    principal = await _principal(registry, "02:00:00:00:0a:02")
    # The login was answered from the cache; the decommission then lands before the session
    # joins the live table, so the follower's own pass cannot see it.
    cache.remember(principal.username, principal.tag, PASSWORD)
    cache.accept(principal.username, principal.tag, principal)
    await registry.decommission(principal.device_id)
    await revoker.apply({principal.username})
    sessions.live[principal.username] = principal

    revoker.confirm(principal.username, principal)

    assert await asyncio.wait_for(sessions.kicked.get(), 5) == principal.username
    assert revoker.kicked == 1


async def test_a_session_whose_credential_is_still_cached_costs_no_registry_read(
    registry: DeviceRegistry, accounts: AccountRegistry
) -> None:
    cache, sessions = VerifiedCache(), Sessions()
    revoker = Revoker(registry, accounts, cache, sessions)
    principal = await _principal(registry, "02:00:00:00:0a:03")
    cache.remember(principal.username, principal.tag, PASSWORD)
    sessions.live[principal.username] = principal

    revoker.confirm(principal.username, principal)

    assert not revoker._rechecks  # nothing scheduled: the entry still holds this credential
    assert principal.username in sessions.live


async def test_a_dropped_entry_whose_credential_is_still_current_keeps_its_session(
    registry: DeviceRegistry, accounts: AccountRegistry
) -> None:
    cache, sessions = VerifiedCache(), Sessions()
    revoker = Revoker(registry, accounts, cache, sessions)
    principal = await _principal(registry, "02:00:00:00:0a:04")
    sessions.live[principal.username] = principal  # e.g. the entry was evicted from a full cache

    revoker.confirm(principal.username, principal)
    await asyncio.wait_for(asyncio.gather(*revoker._rechecks), 5)

    assert principal.username in sessions.live
    assert revoker.kicked == 0
