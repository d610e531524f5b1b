"""``mqttprov devices``: list, inspect, decommission and delete devices."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table

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
from provisioning.registry import DeviceEventInfo, DeviceInfo, DevicePage, DeviceStatus

app = typer.Typer(help="List, inspect, decommission and delete devices.", no_args_is_help=True)

DeviceArg = Annotated[
    str, typer.Argument(metavar="ID_OR_MAC", help="Device id, MAC (any notation) or username.")
]


def device_json(device: DeviceInfo) -> dict[str, Any]:
    """A device as JSON: every column except the password hash."""
    return device.model_dump(mode="json")


@app.command("list")
def list_devices(
    status: Annotated[
        DeviceStatus | None, typer.Option("--status", "-s", help="Only devices in this status.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many devices.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many devices first.")] = 0,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """List devices, oldest first."""
    settings = settings_from(config)

    async def work() -> DevicePage:
        async with open_registry(settings) as registry:
            return await registry.list_devices(status=status, limit=limit, offset=offset)

    page = run(work)
    if as_json:
        print_json({"devices": [device_json(d) for d in page.devices], "total": page.total})
        return
    table = Table(title=f"devices ({len(page.devices)} of {page.total})")
    for column in ("id", "mac", "username", "status", "firmware", "last seen"):
        table.add_column(column, no_wrap=column in {"id", "mac", "username"})
    for d in page.devices:
        table.add_row(
            str(d.id),
            d.mac,
            d.mqtt_username,
            d.status.value,
            d.firmware_version or "-",
            d.last_seen_at.isoformat(timespec="seconds") if d.last_seen_at else "never",
        )
    stdout.print(table)


@app.command("show")
def show(device: DeviceArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one device and its most recent events."""
    settings = settings_from(config)

    async def work() -> tuple[DeviceInfo, list[DeviceEventInfo]]:
        async with open_registry(settings) as registry:
            found = await registry.resolve(device)
            return found, await registry.events(found.id, limit=20)

    found, events = run(work)
    if as_json:
        print_json({"device": device_json(found), "events": [e.model_dump(mode="json") for e in events]})
        return
    table = Table(show_header=False, box=None)
    for key, value in device_json(found).items():
        table.add_row(key, "-" if value is None or value == [] else str(value))
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
            found = await registry.resolve(device)
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
            return await registry.resolve(device)

    found = run(lookup)
    if not yes:
        if not sys.stdin.isatty():
            fail("refusing to ask for confirmation: stdin is not a terminal (pass --yes)", EXIT_USAGE)
        if not typer.confirm(f"delete device {found.id} ({found.mac}, {found.status.value})?"):
            fail("not deleted")

    async def work() -> DeviceInfo:
        async with open_registry(settings) as registry:
            return await registry.delete(found.id)

    gone = run(work)
    if as_json:
        print_json(device_json(gone))
    else:
        stdout.print(f"deleted {gone.id} ({gone.mac})")
