"""Load :class:`Settings` from a TOML file overlaid by environment variables.

Precedence, highest first: ``MQTTPROV_<SECTION>__<KEY>`` environment variables, one TOML file,
the defaults in :mod:`config.models`. The file is the first of: ``--config PATH``, the
``MQTTPROV_CONFIG`` variable (both must name an existing file), ``./mqttprov.toml`` and
``/etc/mqttprov/mqttprov.toml`` (each when present).

Every other ``MQTTPROV_*`` variable must name a setting, as every key in the file must: a
misspelled one is an error, not silently ignored. ``MQTTPROV_TEST_*`` belongs to the test suite.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from config.errors import ConfigError
from config.models import Settings

ENV_PREFIX = "MQTTPROV_"
DEFAULT_CONFIG_FILE = Path("mqttprov.toml")
SYSTEM_CONFIG_FILE = Path("/etc/mqttprov/mqttprov.toml")
#: The variable naming the file when ``--config`` is not given.
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
#: Variables with the prefix that are not settings: the suite's own (``MQTTPROV_TEST_POSTGRES_URL``).
_NOT_SETTINGS_PREFIX = f"{ENV_PREFIX}TEST_"


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


def resolve_config_path(path: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read (see the module docstring for the order), or None for defaults only."""
    env = os.environ if environ is None else environ
    if path is not None:
        return _existing(path, path)
    named = env.get(CONFIG_ENV)
    if named:
        return _existing(Path(named), f"{CONFIG_ENV}={named}")
    for candidate in (DEFAULT_CONFIG_FILE, SYSTEM_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def _existing(path: Path, named_by: object) -> Path:
    if not path.is_file():
        raise ConfigError(f"config error: {named_by}: no such file")
    return path


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
    check_environment(os.environ)
    data = read_toml(resolved) if resolved is not None else {}
    try:
        sourced = _SourcedSettings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
    # Hand out the plain model: the environment has been read once, here.
    return Settings.model_validate(sourced.model_dump())


def setting_variables() -> list[str]:
    """Every ``MQTTPROV_<SECTION>__<KEY>`` variable that names a setting."""
    return [
        f"{ENV_PREFIX}{name}__{key}".upper()
        for name, section in Settings()
        for key in type(section).model_fields
    ]


def check_environment(environ: Mapping[str, str]) -> None:
    """A :class:`ConfigError` for the first ``MQTTPROV_*`` variable that names no setting.

    pydantic-settings would ignore ``MQTTPROV_BROKR__PORT`` and ``MQTTPROV_BROKER_PORT``; an
    operator who set one believes it is in force.
    """
    known = setting_variables()
    for name in sorted(environ):
        upper = name.upper()  # the settings read variables case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV or upper.startswith(_NOT_SETTINGS_PREFIX):
            continue
        if upper in known:
            continue
        # Compared without the prefix, which every name shares and which would make all look alike.
        bare = {variable.removeprefix(ENV_PREFIX): variable for variable in known}
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), bare, n=1, cutoff=0.85)
        hint = (
            f" (did you mean {bare[close[0]]}?)" if close else f" (settings are {ENV_PREFIX}<SECTION>__<KEY>)"
        )
        raise ConfigError(f"config error: {name}: no such setting{hint}")


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
