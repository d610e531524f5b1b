"""``mqttprov config``: inspect the effective configuration."""

from __future__ import annotations

from typing import Any

import typer
from pydantic import SecretStr

from broker.cli.common import MASK, ConfigOption, JsonOption, masked_url, print_json, settings_from, stdout
from config import Settings

app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret replaced by ``***``."""
    data = settings.model_dump(mode="json")
    for section_name, section in settings:
        for key, value in section:
            if isinstance(value, SecretStr):
                data[section_name][key] = MASK if value.get_secret_value() else ""
    data["database"]["url"] = masked_url(settings.database.url)
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(data: dict[str, Any]) -> str:
    """The effective configuration in the config file's own notation (unset keys commented)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"# {key} is not set" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


@app.command("show")
def show(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Print the effective configuration (file, environment and defaults merged; secrets masked)."""
    settings = settings_from(config)
    data = masked(settings)
    if as_json:
        print_json(data)
    else:
        stdout.print(render_toml(data), markup=False, end="")
