"""Load :class:`Settings` from a TOML file overlaid by environment variables.

Precedence, highest first: ``MQTTPROV_<SECTION>__<KEY>`` environment variables, the TOML file
(``--config PATH``, else ``./mqttprov.toml`` when present), the defaults in :mod:`config.models`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from config.errors import ConfigError
from config.models import Settings

ENV_PREFIX = "MQTTPROV_"
DEFAULT_CONFIG_FILE = Path("mqttprov.toml")


class _SourcedSettings(BaseSettings, Settings):
    """:class:`Settings` with the environment layered over the values read from TOML."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003 - signature fixed by pydantic-settings
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so it wins over the file's values (passed in as init kwargs).
        return (env_settings, init_settings)


def resolve_config_path(path: Path | None) -> Path | None:
    """The file to read: the explicit one (which must exist), else ``./mqttprov.toml`` if present."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config error: {path}: no such file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file, turning every failure into a one-line :class:`ConfigError`."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config error: {path}: {exc.strerror or exc}") from exc


def load_settings(path: Path | None = None) -> Settings:
    """The effective configuration, or a :class:`ConfigError` naming the first bad key."""
    resolved = resolve_config_path(path)
    data = read_toml(resolved) if resolved is not None else {}
    try:
        sourced = _SourcedSettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
    # Hand out the plain model: the environment has been read once, here.
    return Settings.model_validate(sourced.model_dump())


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``config error: broker.port: 'abc' is not an integer``."""
    return "\n".join(_format_one(err) for err in exc.errors(include_url=False))


def _format_one(err: ErrorDetails) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "(top level)"
    value = err.get("input")
    ctx = err.get("ctx") or {}
    kind = err["type"]
    reason = _REASONS.get(kind)
    if kind == "extra_forbidden":
        return f"config error: {key}: unknown key"
    if reason is not None:
        return f"config error: {key}: {value!r} {reason.format(**ctx)}"
    if kind == "value_error":
        # Our own model validators: the message names the keys involved.
        return f"config error: {key}: {ctx.get('error', err['msg'])}"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return f"config error: {key}: must be a table, not {value!r}"
    return f"config error: {key}: {value!r}: {err['msg']}"


_REASONS: dict[str, str] = {
    "int_parsing": "is not an integer",
    "int_type": "is not an integer",
    "int_from_float": "is not an integer",
    "bool_parsing": "is not a boolean (use true or false)",
    "bool_type": "is not a boolean (use true or false)",
    "string_type": "is not a string",
    "float_parsing": "is not a number",
    "greater_than_equal": "is too small (allowed: >= {ge})",
    "less_than_equal": "is too large (allowed: <= {le})",
    "greater_than": "is too small (allowed: > {gt})",
    "less_than": "is too large (allowed: < {lt})",
    "literal_error": "is not allowed (allowed: {expected})",
    "enum": "is not allowed (allowed: {expected})",
    "path_type": "is not a path",
    "list_type": "is not a list",
}
