"""A package of another distribution named like one of ours stops mqttprov with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.packages import foreign_packages
from tests.helpers import run_mqttprov


def test_our_own_packages_are_found() -> None:
    assert foreign_packages() == []


@pytest.mark.parametrize("name", ["config", "provisioning", "auth_plugin"])
def test_a_shadowing_package_is_one_error_line(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("# another distribution's package\n")
    done = run_mqttprov("--version", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: mqttprov's packages are shadowed by others of the same name: ")
    assert f"{name} ({tmp_path / name})" in lines[0]
    assert "pipx" in lines[0]
