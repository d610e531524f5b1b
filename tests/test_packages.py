"""A package of another distribution named like one of ours, or another amqtt than the one our
broker is written against, stops mqttprov with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.packages import AMQTT_PIN, foreign_packages
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


def test_the_pin_is_the_installed_amqtt_and_pyproject_s() -> None:
    import amqtt  # noqa: PLC0415 - only this test needs the broker library itself

    assert amqtt.__version__ == AMQTT_PIN
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"amqtt=={AMQTT_PIN}"' in pyproject


def test_another_amqtt_release_is_one_error_line(tmp_path: Path) -> None:
    # Metadata of an amqtt 9.9.9 found first on the path, as pip would leave after an upgrade.
    meta = tmp_path / "amqtt-9.9.9.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: amqtt\nVersion: 9.9.9\n")
    # Checked where amqtt is first imported (broker.embedded): `serve` stops before opening
    # anything. Port 0 all the same, should the check ever not stop it.
    env = {
        "PYTHONPATH": str(tmp_path),
        "MQTTPROV_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}",
        "MQTTPROV_BROKER__PORT": "0",
    }
    done = run_mqttprov("serve", cwd=tmp_path, env=env, timeout=10)
    assert done.returncode == 1
    expected = (
        f"error: mqttprov needs amqtt {AMQTT_PIN} (its broker overrides amqtt's internals), found 9.9.9: "
        f"pip install 'amqtt=={AMQTT_PIN}', or install mqttprov into an environment of its own"
    )
    assert done.stderr.strip().splitlines() == [expected]
