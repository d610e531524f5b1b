"""``mqttprov provision-device``: enrol one device from the command line, as its firmware would."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from broker.cli.common import EXIT_USAGE, JsonOption, fail, print_json, stdout
from provisioning.client import Credentials, ProvisioningClientError, provision
from provisioning.contract import PROVISION_USERNAME


def provision_device(  # typer passes options by keyword
    *,
    mac: Annotated[str, typer.Option("--mac", help="The device's MAC address (sent as written).")],
    host: Annotated[str, typer.Option("--host", help="The broker's host name or address.")],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The broker's MQTT port.")],
    secret: Annotated[
        str | None, typer.Option("--secret", help="The fleet secret (provisioning.auth = fleet_secret).")
    ] = None,
    device_key: Annotated[
        str | None,
        typer.Option("--device-key", help="This device's key (provisioning.auth = device_key)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the credentials JSON to this file (mode 0600).")
    ] = None,
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the credentials JSON even on a terminal.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds one attempt may take (connect to reply).")
    ] = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Ask a broker for a device's MQTT credentials, exactly as the device would."""
    if secret is not None and device_key is not None:
        fail("error: --secret and --device-key exclude each other", EXIT_USAGE)
    # Decide before enrolling: a refused print after the broker issued credentials would burn them.
    if out is None and not show_password and sys.stdout.isatty():
        fail("refusing to print the password to a terminal: use --out FILE or --show-password", EXIT_USAGE)
    target = _OutFile.open(out) if out is not None else None
    proof = secret if secret is not None else device_key
    try:
        credentials = provision(
            host,
            port,
            mac,
            username=PROVISION_USERNAME if proof is not None else None,
            password=proof,
            timeout=timeout,
            on_retry=lambda reason, pause: typer.echo(
                f"{mac}: {reason}; asking again in {pause:.0f} s", err=True
            ),
        )
    except ProvisioningClientError as exc:
        if target is not None:
            target.discard()
        fail(f"error: {exc}")
    except KeyboardInterrupt:
        if target is not None:
            target.discard()
        fail("interrupted", 130)
    if target is None:
        print_json(credentials.as_dict())
        return
    target.write(credentials)
    if as_json:
        print_json(credentials.as_dict(include_password=False) | {"out": str(out)})
    else:
        stdout.print(
            f"provisioned {mac}: device {credentials.device_id}, username {credentials.mqtt_username}, "
            f"broker {credentials.mqtt_host}:{credentials.mqtt_port}; credentials written to {out}",
            markup=False,
        )


@dataclass(frozen=True)
class _OutFile:
    """The --out file, opened before enrolling so that a bad path costs no enrolment."""

    path: Path
    fd: int
    created: bool

    @classmethod
    def open(cls, path: Path) -> _OutFile:
        """Open or create ``path`` with mode 0600, but do not truncate it yet.

        A failed enrolment must not wipe credentials saved there by an earlier one.
        """
        created = True
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                created = False
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)  # an existing file would keep its old mode
        except OSError as exc:
            fail(f"error: cannot write {path}: {exc.strerror or exc}", EXIT_USAGE)
        return cls(path, fd, created)

    def write(self, credentials: Credentials) -> None:
        """Replace the file's content with the credentials JSON."""
        with os.fdopen(self.fd, "w", encoding="utf-8") as fh:
            fh.truncate(0)
            json.dump(credentials.as_dict(), fh, indent=2)
            fh.write("\n")

    def discard(self) -> None:
        """Close it; remove it when this command created it."""
        os.close(self.fd)
        if self.created:
            self.path.unlink(missing_ok=True)
