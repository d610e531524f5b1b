"""``mqttprov keys``: per-device secrets for the factory line."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.cli.common import EXIT_USAGE, ConfigOption, fail, settings_from
from provisioning import InvalidMacError
from provisioning.keys import derive_device_key

app = typer.Typer(help="Derive per-device provisioning keys for the factory line.", no_args_is_help=True)


@app.command("derive")
def derive(
    mac: Annotated[str, typer.Argument(metavar="MAC", help="The device's MAC address (any notation).")],
    config: ConfigOption = None,
) -> None:
    """Print the device_key to flash into the device with MAC (and nothing else, for scripts).

    Uses provisioning.device_key_secret; the key is a secret: keep it out of shared logs.
    """
    settings = settings_from(config)
    secret = settings.provisioning.device_key_secret
    if secret is None or not secret.get_secret_value():
        fail("error: provisioning.device_key_secret is not set", EXIT_USAGE)
    try:
        key = derive_device_key(secret.get_secret_value(), mac)
    except InvalidMacError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    typer.echo(key)
