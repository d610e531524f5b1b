"""The revocation follower against a real registry: in-process changes act at once, and a session
that goes live just after its credential was dropped is checked again and thrown off; and the
admission of logins by the time their caller waits."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref
from collections.abc import Iterable

import pytest

from auth_plugin.authenticator import ConnectAttempt
from auth_plugin.cache import VerifiedCache
from auth_plugin.principals import SERVER_UNAVAILABLE, DevicePrincipal, Principal, credential_tag
from auth_plugin.revocation import Revoker
from broker.core import auth_core
from provisioning.registry import DeviceCredentials, DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.migrate import upgrade
from tests.auth_support import PASSWORD, make_device
from tests.helpers import broker_settings


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
    revoker = Revoker(registry, accounts, cache, Sessions())
    principal = await _principal(registry, "02:00:00:00:0a:01")
    cache.remember(principal.username, principal.tag, PASSWORD)
    cache.accept(principal.username, principal.tag, principal)

    await registry.decommission(principal.device_id)

    assert cache.principal(principal.username, PASSWORD) is None
    assert not cache.holds(principal.username, principal.tag)
    assert revoker.kicked == 0  # nothing was live


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


async def test_a_login_that_takes_the_client_id_during_the_registry_read_is_not_thrown_off(
    registry: DeviceRegistry, accounts: AccountRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, sessions = VerifiedCache(), Sessions()
    revoker = Revoker(registry, accounts, cache, sessions)
    current = await _principal(registry, "02:00:00:00:0a:05")
    # A session on a credential since replaced (a reissue): the follower reads the registry to
    # decide, and while it reads, the device logs in again with its new credential.
    stale = dataclasses.replace(current, tag=credential_tag("$2b$04$" + "x" * 53))
    sessions.live[current.username] = stale
    read = registry.find_credentials_by_username

    async def read_while_the_new_login_lands(username: str) -> DeviceCredentials | None:
        record = await read(username)
        sessions.live[current.username] = current
        return record

    monkeypatch.setattr(registry, "find_credentials_by_username", read_while_the_new_login_lands)

    await revoker.apply({current.username})

    assert sessions.live.get(current.username) is current
    assert revoker.kicked == 0


@pytest.mark.parametrize(("answer_within", "refused"), [(None, False), (1.0, True)])
async def test_logins_that_could_not_be_checked_before_the_caller_gives_up_are_refused_at_once(
    sqlite_url: str, answer_within: float | None, refused: bool
) -> None:
    # authd's callers give up after request_timeout (5 s), sooner than a CONNECT timeout (10 s):
    # a check that would start after that is refused at once, not run for nobody.
    core = auth_core(broker_settings(sqlite_url), answer_within=answer_within)
    try:
        await upgrade(core.registry.engine)
        device = await make_device(core.registry, "02:00:00:00:0a:05")
        # A backlog of the bcrypt workers (the fault injected): about 2 s until a new check starts.
        core.hasher.seconds_per_check, core.hasher.pending = 0.5, 4 * core.hasher.workers
        user = device.mqtt_username
        decision = await core.authenticator.authenticate(ConnectAttempt(user, user, "wrong-password"))
        core.hasher.pending = 0
    finally:
        await core.close()
    assert (decision.code == SERVER_UNAVAILABLE) is refused
    assert core.authenticator.stats.overload_refusals == int(refused)


async def test_the_change_watcher_does_not_keep_a_follower_alive(
    registry: DeviceRegistry, accounts: AccountRegistry
) -> None:
    revoker = Revoker(registry, accounts, VerifiedCache(), Sessions())
    gone = weakref.ref(revoker)
    del revoker
    gc.collect()
    assert gone() is None
    # Commits after it went still work (and tell nobody).
    device = await make_device(registry, "02:00:00:00:0a:06")
    await registry.decommission(device.id)
