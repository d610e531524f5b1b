"""``mqttprov provision-device``: enrol one device from the command line, as its firmware would."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from broker.cli.common import EXIT_USAGE, ConfigOption, JsonOption, fail, print_json, settings_from, stdout
from config import Settings
from provisioning import InvalidMacError, parse_mac
from provisioning.client import (
    DEFAULT_DEADLINE,
    RETRYABLE,
    ClientErrorCode,
    Credentials,
    ProvisioningClientError,
    provision,
)
from provisioning.contract import PROVISION_USERNAME
from provisioning.keys import derive_device_key

#: Where a broker whose configured host is a wildcard address is asked: this machine.
LOCAL_HOST = "127.0.0.1"


def provision_device(  # typer passes options by keyword
    *,
    mac: Annotated[str, typer.Option("--mac", help="The device's MAC address (sent as written).")],
    host: Annotated[
        str | None,
        typer.Option("--host", help="The broker's host name or address (default: the configuration's)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port", min=1, max=65535, help="The broker's MQTT port (default: the configuration's)"
        ),
    ] = None,
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
    attempts: Annotated[
        int, typer.Option("--attempts", min=1, help="Requests to send at most (pending, rate-limited).")
    ] = 5,
    deadline: Annotated[
        float, typer.Option("--deadline", min=1, help="Seconds the whole command may take, retries included.")
    ] = DEFAULT_DEADLINE,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask a broker for a device's MQTT credentials, exactly as the device would.

    Without --host, --port or a proof, the configuration's are used: the advertised address
    (this machine when it is a wildcard) and the fleet secret or the key derived for --mac.
    """
    if secret is not None and device_key is not None:
        fail("error: --secret and --device-key exclude each other", EXIT_USAGE)
    try:
        parse_mac(mac)
    except InvalidMacError as exc:
        fail(f"error: {exc}", EXIT_USAGE)
    # Decide before enrolling: a refused print after the broker issued credentials would burn them.
    if out is None and not show_password and sys.stdout.isatty():
        fail(
            "error: refusing to print the password to a terminal: use --out FILE or --show-password",
            EXIT_USAGE,
        )
    proof = secret if secret is not None else device_key
    if host is None or port is None or proof is None:
        settings = settings_from(config)
        host = host or _dialable(settings)
        port = port or settings.broker.effective_advertised_port
        if port == 0:
            fail(
                "error: broker.port is 0 (a free port, picked when the broker starts): pass --port",
                EXIT_USAGE,
            )
        proof = proof if proof is not None else _configured_proof(settings, mac)
    target = _OutFile.open(out) if out is not None else None
    waited: list[str] = []

    def told(reason: str, pause: float) -> None:
        waited.append(reason)
        typer.echo(f"{mac}: {reason}; asking again in {pause:.0f} s", err=True)

    try:
        credentials = provision(
            host,
            port,
            mac,
            username=PROVISION_USERNAME if proof is not None else None,
            password=proof,
            timeout=timeout,
            max_attempts=attempts,
            deadline=deadline,
            on_retry=told,
        )
    except ProvisioningClientError as exc:
        if target is not None:
            target.discard()
        fail(f"error: {_gave_up(exc, mac, waited)}")
    except KeyboardInterrupt:
        if target is not None:
            target.discard()
        fail("error: interrupted", 130)
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


def _dialable(settings: Settings) -> str:
    broker = settings.broker
    if broker.advertised_host is None and broker.host_is_wildcard:
        return LOCAL_HOST
    return broker.effective_advertised_host


def _configured_proof(settings: Settings, mac: str) -> str | None:
    section = settings.provisioning
    if section.auth == "fleet_secret" and section.fleet_secret is not None:
        return section.fleet_secret.get_secret_value() or None
    if section.auth == "device_key" and section.device_key_secret is not None:
        master = section.device_key_secret.get_secret_value()
        return derive_device_key(master, mac) if master else None
    return None


def _gave_up(exc: ProvisioningClientError, mac: str, waited: list[str]) -> str:
    """The failure as one line; a device that was ``pending`` is said to be, whatever came last.

    A pending device asked again inside the broker's rate limit is told ``RATE_LIMITED`` (or
    ``UNAVAILABLE``); the news for the operator is still that it waits for approval.
    """
    pending = exc.error_code == ClientErrorCode.PENDING or (
        "pending" in waited and exc.error_code in RETRYABLE
    )
    if not pending:
        return str(exc)
    return (
        f"{ClientErrorCode.PENDING}: {mac} is waiting for an operator's approval; gave up after "
        f"{len(waited) + 1} requests (approve it with: mqttprov devices approve {mac})"
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
