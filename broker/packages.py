"""mqttprov's four top-level packages must be its own: another distribution's ``config`` (there
is one on PyPI) installed beside it would shadow ours and fail far from the cause.

Imports nothing of ours, so that it can run before anything that would import a shadowed package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
