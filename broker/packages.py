"""What mqttprov must find installed before it imports anything: its own four top-level packages
(another distribution's ``config``, on PyPI, would shadow ours and fail far from the cause), and
the one amqtt release its broker is written against (docs/amqtt.md).

Imports nothing of ours, so that it can run before anything that would import a shadowed package.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: The amqtt release ``broker/`` overrides the internals of (pyproject.toml pins the same).
AMQTT_PIN = "0.12.1"

#: Each package beside ``broker``, with a module only ours has.
_OURS = {"config": "models.py", "provisioning": "contract.py", "auth_plugin": "authenticator.py"}


def foreign_packages() -> list[str]:
    """``name (where it was found)`` for each of our packages that resolves to another one."""
    home = Path(__file__).resolve().parent.parent
    found: list[str] = []
    for name, marker in _OURS.items():
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
        if origin != home / name or not (home / name / marker).is_file():
            found.append(f"{name} ({origin or 'not found'})")
    return found


def require_own_packages() -> None:
    """Stop with one line when a package of another distribution shadows one of ours."""
    foreign = foreign_packages()
    if foreign:
        raise SystemExit(
            "error: mqttprov's packages are shadowed by others of the same name: "
            + ", ".join(foreign)
            + "; install mqttprov into an environment of its own (a venv, or pipx install)"
        )


def require_amqtt_pin() -> None:
    """Stop with one line when the installed amqtt is not the release our broker overrides.

    ``broker/`` replaces and reads amqtt's private methods and attributes; another release could
    change them underneath without an error, only wrong behaviour (docs/amqtt.md).
    """
    try:
        found = version("amqtt")
    except PackageNotFoundError:
        found = "none"
    if found != AMQTT_PIN:
        raise SystemExit(
            f"error: mqttprov needs amqtt {AMQTT_PIN} (its broker overrides amqtt's internals), "
            f"found {found}: pip install 'amqtt=={AMQTT_PIN}', or install mqttprov into an "
            "environment of its own"
        )
