"""``mqttprov db``: database schema management."""

from __future__ import annotations

import typer

from broker.cli.common import ConfigOption, JsonOption, open_registry, print_json, run, settings_from, stdout
from provisioning.registry.migrate import upgrade as run_upgrade

app = typer.Typer(help="Manage the registry's database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Create or migrate the registry's tables to this version's schema (safe to repeat)."""
    settings = settings_from(config)

    async def work() -> tuple[str | None, str]:
        async with open_registry(settings) as registry:
            return await run_upgrade(registry.engine)

    before, after = run(work)
    if as_json:
        print_json({"before": before, "after": after})
    elif before == after:
        stdout.print(f"database already at revision {after}")
    else:
        stdout.print(f"database upgraded from {before or 'empty'} to revision {after}")
