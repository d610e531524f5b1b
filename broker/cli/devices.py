"""``mqttprov devices``: enrol, list, inspect, approve, reset, decommission and delete devices."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from broker.cli import device_files
from broker.cli.common import (
    EXIT_USAGE,
    ConfigOption,
    JsonOption,
    fail,
    open_registry,
    print_json,
    run,
    settings_from,
    stdout,
)
from broker.cli.device_filters import (
    CreatedFrom,
    CreatedUntil,
    FilterLabelOption,
    SearchOption,
    SeenFrom,
    SeenUntil,
    StatusOption,
    device_filter,
    labels_from,
)
from provisioning import DeviceNotFoundError, InvalidMacError, parse_mac
from provisioning.registry import (
    DeviceEventInfo,
    DeviceInfo,
    DevicePage,
    DeviceRegistry,
    DeviceStatus,
    InvalidLabelError,
)
from provisioning.registry.labels import validate_label_key
from provisioning.registry.transfer import (
    too_long,
)

app = typer.Typer(
    help="Enrol, list, inspect, approve, reset, decommission and delete devices.", no_args_is_help=True
)

DeviceArg = Annotated[
    str, typer.Argument(metavar="ID_OR_MAC", help="Device id, MAC (any notation) or username.")
]
LabelOption = Annotated[
    list[str] | None,
    typer.Option("--label", "-l", metavar="KEY=VALUE", help="A label (repeat for several)."),
]


def _labels_text(labels: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


async def find(registry: DeviceRegistry, device: str) -> DeviceInfo:
    """The device ``device`` names, as :meth:`DeviceRegistry.resolve` finds it.

    Text that is neither an id, a MAC nor a username is "no device", saying what is accepted,
    rather than resolve's "not a MAC address" (it may have been meant as a username).
    """
    try:
        return await registry.resolve(device)
    except InvalidMacError as exc:
        raise DeviceNotFoundError(
            f"no device matches {device.strip()!r} (give a device id, a MAC address or a username)"
        ) from exc


def device_json(device: DeviceInfo) -> dict[str, Any]:
    """A device as JSON: every column except the password hash."""
    return device.model_dump(mode="json")


@app.command("list")
def list_devices(  # typer passes options by keyword
    *,
    status: StatusOption = None,
    label: FilterLabelOption = None,
    search: SearchOption = None,
    created_from: CreatedFrom = None,
    created_until: CreatedUntil = None,
    seen_from: SeenFrom = None,
    seen_until: SeenUntil = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many devices.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many devices first.")] = 0,
    after: Annotated[
        str | None, typer.Option("--after", metavar="CURSOR", help="The page after a page's next_cursor.")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """List devices, oldest first; filters combine (AND), with the exact total that matches."""
    wanted = device_filter(status, label, search, (created_from, created_until), (seen_from, seen_until))
    settings = settings_from(config)

    async def work() -> DevicePage:
        async with open_registry(settings) as registry:
            return await registry.search_devices(wanted, limit=limit, offset=offset, after=after)

    page = run(work)
    if as_json:
        print_json(
            {
                "devices": [device_json(d) for d in page.devices],
                "total": page.total,
                "next_cursor": page.next_cursor,
            }
        )
        return
    table = Table(title=f"devices ({len(page.devices)} of {page.total})")
    for column in ("id", "mac", "username", "status", "firmware", "last seen", "labels"):
        table.add_column(column, no_wrap=column in {"id", "mac", "username"})
    for d in page.devices:
        table.add_row(
            str(d.id),
            d.mac,
            d.mqtt_username,
            d.status.value,
            d.firmware_version or "-",
            d.last_seen_at.isoformat(timespec="seconds") if d.last_seen_at else "never",
            _labels_text(d.labels),
        )
    stdout.print(table)
    if page.next_cursor is not None:
        stdout.print(f"next page: --after {page.next_cursor}", style="dim", markup=False)


@app.command("show")
def show(device: DeviceArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one device and its most recent events."""
    settings = settings_from(config)

    async def work() -> tuple[DeviceInfo, list[DeviceEventInfo]]:
        async with open_registry(settings) as registry:
            found = await find(registry, device)
            return found, await registry.events(found.id, limit=20)

    found, events = run(work)
    if as_json:
        print_json({"device": device_json(found), "events": [e.model_dump(mode="json") for e in events]})
        return
    table = Table(show_header=False, box=None)
    for key, value in device_json(found).items():
        shown = _labels_text(value) if key == "labels" else str(value)
        table.add_row(key, "-" if value is None or value == [] else shown)
    stdout.print(table)
    history = Table(title="recent events")
    for column in ("time", "kind", "actor", "count", "detail"):
        history.add_column(column)
    for e in events:
        history.add_row(
            e.last_at.isoformat(timespec="seconds"), e.kind, e.actor, str(e.count), str(e.detail or "")
        )
    stdout.print(history)


@app.command("decommission")
def decommission(device: DeviceArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Retire a device now: its credentials stop working (no prompt: this is the emergency action)."""
    settings = settings_from(config)

    async def work() -> DeviceInfo:
        async with open_registry(settings) as registry:
            found = await find(registry, device)
            return await registry.decommission(found.id)

    done = run(work)
    if as_json:
        print_json(device_json(done))
    else:
        stdout.print(f"decommissioned {done.id} ({done.mac})")


@app.command("delete")
def delete(
    device: DeviceArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a device's row (its audit events are kept)."""
    settings = settings_from(config)

    async def lookup() -> DeviceInfo:
        async with open_registry(settings) as registry:
            return await find(registry, device)

    found = run(lookup)
    if not yes:
        if not sys.stdin.isatty():
            fail("error: refusing to ask for confirmation: stdin is not a terminal (pass --yes)", EXIT_USAGE)
        if not typer.confirm(f"delete device {found.id} ({found.mac}, {found.status.value})?"):
            fail("error: not deleted")

    async def work() -> DeviceInfo:
        async with open_registry(settings) as registry:
            return await registry.delete(found.id)

    gone = run(work)
    if as_json:
        print_json(device_json(gone))
    else:
        stdout.print(f"deleted {gone.id} ({gone.mac})")


@app.command("label")
def label(
    device: DeviceArg,
    labels: Annotated[
        list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", help="Labels to set (a key's new value).")
    ] = None,
    remove: Annotated[
        list[str] | None,
        typer.Option("--remove", "-r", metavar="KEY", help="A label key to delete (repeat)."),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set and remove a device's labels; with neither, show them."""
    wanted = labels_from(labels)
    try:
        keys = [validate_label_key(key) for key in remove or []]
    except InvalidLabelError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    settings = settings_from(config)

    async def work() -> DeviceInfo:
        async with open_registry(settings) as registry:
            found = await find(registry, device)
            if not wanted and not keys:
                return found
            return await registry.set_labels(found.id, wanted, remove=keys)

    changed = run(work)
    if as_json:
        print_json(device_json(changed))
    else:
        stdout.print(f"{changed.id} ({changed.mac}): {_labels_text(changed.labels)}", markup=False)


# -- enrolment ---------------------------------------------------------------------------------


@app.command("add")
def add(  # typer passes arguments and options by keyword
    mac: Annotated[str, typer.Argument(metavar="MAC", help="The device's MAC address (any notation).")],
    *,
    firmware: Annotated[str | None, typer.Option("--firmware", help="Expected firmware version.")] = None,
    note: Annotated[str | None, typer.Option("--note", help="Free text for operators.")] = None,
    label: LabelOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Allow one MAC to enrol (status approved; what allowlist mode checks)."""
    labels = labels_from(label)
    problem = too_long(firmware, note)
    if problem is not None:
        fail(f"error: {problem}", EXIT_USAGE)
    try:
        parse_mac(mac)
    except InvalidMacError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    settings = settings_from(config)

    async def work() -> DeviceInfo:
        async with open_registry(settings) as registry:
            return await registry.add_allowed(mac, firmware_version=firmware, note=note, labels=labels)

    added = run(work)
    if as_json:
        print_json(device_json(added))
    else:
        stdout.print(f"added {added.mac} as {added.id} ({added.status.value}): it may enrol")


# -- operator decisions ------------------------------------------------------------------------

Transition = Callable[[DeviceRegistry, uuid.UUID], Awaitable[DeviceInfo]]


def _decide(
    device: str,
    config: Path | None,
    as_json: bool,
    change: Transition,
    done: str,
    *,
    target: DeviceStatus | None = None,
) -> None:
    """Apply ``change`` to the device; when it is in ``target`` already, change nothing (exit 0)."""
    settings = settings_from(config)

    async def work() -> tuple[DeviceInfo, bool]:
        async with open_registry(settings) as registry:
            found = await find(registry, device)
            if found.status is target:
                return found, False
            return await change(registry, found.id), True

    changed, did = run(work)
    if as_json:
        print_json(device_json(changed))
    elif did:
        stdout.print(f"{done} {changed.id} ({changed.mac}): now {changed.status.value}")
    else:
        stdout.print(f"{changed.id} ({changed.mac}) is {changed.status.value} already: nothing changed")


@app.command("approve")
def approve(device: DeviceArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Let a pending or rejected device enrol on its next request (approved already: no change)."""
    _decide(device, config, as_json, DeviceRegistry.approve, "approved", target=DeviceStatus.APPROVED)


@app.command("reject")
def reject(device: DeviceArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Refuse a pending or approved (not yet enrolled) device (rejected already: no change)."""
    _decide(device, config, as_json, DeviceRegistry.reject, "rejected", target=DeviceStatus.REJECTED)


@app.command("reset")
def reset(device: DeviceArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Revoke a device's credentials now and allow exactly one new enrolment."""
    _decide(device, config, as_json, DeviceRegistry.reset, "reset")


# -- files ---------------------------------------------------------------------------------------

app.command("export")(device_files.export)
app.command("import")(device_files.import_devices)
