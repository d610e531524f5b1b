"""``mqttprov bridge sync``: reconcile Mosquitto's clients and the registry after an outage.

- A device the registry holds valid credentials for, but which Mosquitto lost (no client, a
  disabled one, or another password), is **reset** in the registry: its next login is refused
  and, by the firmware rule, it provisions again.
- A managed client (``device_*`` or carrying the mqttprov marker) that the registry holds no
  valid credential for is **disabled** (and its password left useless).
- A service account Mosquitto lost or holds another password for cannot be repaired without
  its plaintext: it is reported (and a stale client disabled); ``bridge accounts rotate`` fixes it.
- Clients mqttprov does not manage (the admin, the worker, the operator's own) are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

from auth_plugin.principals import credential_tag
from broker.external.mosquitto.bridge import DynsecBridge
from broker.external.mosquitto.dynsec import ClientInfo
from broker.external.mosquitto.layout import tag_of
from provisioning.contract import DEVICE_USERNAME_PREFIX
from provisioning.registry import ACTIVE_STATUSES, DeviceInfo
from provisioning.registry.models import utcnow

logger = logging.getLogger(__name__)

Action = Literal["reset_device", "disable_client", "account_needs_rotate"]
_PAGE = 1000


@dataclass(frozen=True)
class SyncStep:
    """One thing sync did (or, with ``--dry-run``, would do)."""

    action: Action
    username: str
    reason: str


@dataclass
class SyncReport:
    """What sync looked at and what it did."""

    dry_run: bool
    devices_checked: int = 0
    accounts_checked: int = 0
    clients_checked: int = 0
    steps: list[SyncStep] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


async def reconcile(
    bridge: DynsecBridge, *, dry_run: bool = False, grace: float = 10.0, reset_devices: bool = True
) -> SyncReport:
    """Compare both sides and repair what can be repaired; ``grace``: skip credentials issued
    that many seconds ago or less (a worker may be handing them over right now).

    ``reset_devices=False`` only takes access away (disables clients the registry does not back)
    and never resets a device in the registry: what ``bridge run`` does on its own at start.
    """
    report = SyncReport(dry_run=dry_run)
    clients = {client.username: client for client in await bridge.dynsec.list_clients()}
    report.clients_checked = len(clients)
    registry_tags: dict[str, str] = {}
    async for device, tag in _devices_with_credentials(bridge):
        report.devices_checked += 1
        registry_tags[device.mqtt_username] = tag
        issued = device.credentials_issued_at
        if issued is not None and utcnow() - issued < timedelta(seconds=grace):
            continue
        problem = _mismatch(clients.get(device.mqtt_username), tag)
        if problem is not None and reset_devices:
            await _step(report, SyncStep("reset_device", device.mqtt_username, problem), bridge, device)
    for account in await bridge.accounts.list_accounts():
        report.accounts_checked += 1
        found = await bridge.accounts.find(account.name)
        if found is None:
            continue
        tag = credential_tag(found.password_hash)
        registry_tags[account.name] = tag
        client = clients.get(account.name)
        problem = _mismatch(client, tag)
        if problem is not None:
            await _step(report, SyncStep("account_needs_rotate", account.name, problem), bridge, None)
            if client is not None and not client.disabled:
                await _step(report, SyncStep("disable_client", account.name, "stale password"), bridge, None)
    for username, client in sorted(clients.items()):
        managed = username.startswith(DEVICE_USERNAME_PREFIX) or tag_of(client.textdescription) is not None
        if managed and username not in registry_tags and not client.disabled:
            await _step(
                report,
                SyncStep("disable_client", username, "no valid credential in the registry"),
                bridge,
                None,
            )
    return report


def _mismatch(client: ClientInfo | None, tag: str) -> str | None:
    if client is None:
        return "Mosquitto has no such client"
    if client.disabled:
        return "disabled on Mosquitto"
    if tag_of(client.textdescription) != tag:
        return "Mosquitto holds another password"
    return None


async def _step(report: SyncReport, step: SyncStep, bridge: DynsecBridge, device: DeviceInfo | None) -> None:
    report.steps.append(step)
    logger.info(
        "sync %s %s: %s%s", step.action, step.username, step.reason, " (dry run)" if report.dry_run else ""
    )
    if report.dry_run:
        return
    if step.action == "reset_device" and device is not None:
        # The change feed then makes a running bridge revoke the stale client too.
        await bridge.devices.reset(device.id)
        await bridge.revoke(device.mqtt_username)
    elif step.action == "disable_client":
        await bridge.dynsec.disable_client(step.username)


async def _devices_with_credentials(bridge: DynsecBridge) -> Any:
    offset = 0
    while True:
        page = await bridge.devices.list_devices(limit=_PAGE, offset=offset)
        for device in page.devices:
            if device.status not in ACTIVE_STATUSES:
                continue
            record = await bridge.devices.find_credentials_by_username(device.mqtt_username)
            if record is not None and record.password_hash is not None:
                yield record.device, credential_tag(record.password_hash)
        offset += _PAGE
        if offset >= page.total:
            return
