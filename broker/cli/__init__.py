"""The ``mqttprov`` command line: parse, call a service, render. No SQL and no logic here."""

from __future__ import annotations

import errno
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup, TyperOption

from broker.cli import (
    accounts,
    api,
    authd,
    bridge,
    config_cmd,
    db,
    devices,
    keys,
    operators,
    provision,
    tokens,
    worker,
)
from broker.cli.common import ConfigOption, run, settings_from, state
from broker.errors import ServeError
from broker.loop import loop_factory

app = typer.Typer(
    name="mqttprov",
    help="MQTT-native device provisioning broker and auth service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # --install-completion and --show-completion: bash, zsh, fish and PowerShell (README).
    add_completion=True,
)
app.add_typer(devices.app, name="devices")
app.add_typer(db.app, name="db")
app.add_typer(config_cmd.app, name="config")
app.add_typer(keys.app, name="keys")
app.add_typer(accounts.app, name="accounts")
app.add_typer(tokens.app, name="tokens")
app.add_typer(operators.app, name="operators")
app.command("provision-device")(provision.provision_device)
app.add_typer(bridge.app, name="bridge")
app.command("worker")(worker.worker)
app.command("authd")(authd.authd)
app.command("api")(api.api)


def _version() -> str:
    try:
        return version("mqttprov")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mqttprov {_version()}")
        raise typer.Exit


@app.callback()
def main_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Verbose logs and tracebacks for bug reports.")
    ] = False,
    _version_flag: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Operate an mqttprov broker and its device registry."""
    state.debug = debug


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the broker until SIGINT or SIGTERM (migrates the database first)."""
    # Imported here: amqtt (and the pin check in broker.embedded) is for this command alone.
    from broker.embedded import serve as serve_broker  # noqa: PLC0415

    settings = settings_from(config)
    serve_forever = serve_broker
    if settings.api.enabled:
        # FastAPI and uvicorn only when the API is asked for.
        from broker.http.api.hosted import serve_with_api  # noqa: PLC0415

        serve_forever = serve_with_api

    async def work() -> None:
        try:
            await serve_forever(settings)
        except ServeError as exc:
            if not _address_in_use(exc) or getattr(exc, "names_setting", False):
                raise
            raise ServeError(
                f"{exc} (set another: [broker] port in the config file or MQTTPROV_BROKER__PORT; "
                "tls_port and ws_port likewise)"
            ) from exc

    run(work, log=settings.log, loop_factory=loop_factory(settings.broker.event_loop))


def _address_in_use(exc: BaseException) -> bool:
    """True when a listener could not bind because its address is taken."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return True
        cause = cause.__cause__
    return False


def main() -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    _blank_flag_placeholders(command)
    command()


def _blank_flag_placeholders(command: TyperCommand | TyperGroup) -> None:
    """Show flags in help as ``--json``, not ``--json <bool>``: they take no value.

    typer's rich help prints a type placeholder after every option, flags included; an empty
    metavar is printed instead. ``get_params`` also makes (and keeps) each command's ``--help``.
    """
    for param in command.get_params(typer.Context(command)):
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            if isinstance(sub, TyperCommand | TyperGroup):
                _blank_flag_placeholders(sub)


__all__ = ["app", "main"]
