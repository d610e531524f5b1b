"""What a new user tripped over in the CLI (issue 17), each through the installed ``mqttprov``."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tests.helpers import mqttprov_executable, run_mqttprov


@pytest.mark.parametrize(
    "command",
    [[], ["devices", "list"], ["devices", "decommission"], ["provision-device"], ["config", "show"]],
    ids=lambda words: " ".join(words) or "mqttprov",
)
def test_help_shows_no_value_after_a_flag(tmp_path: Path, command: list[str]) -> None:
    done = run_mqttprov(*command, "--help", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "<bool>" not in done.stdout
    flags = [line for line in done.stdout.splitlines() if "--help" in line]
    assert flags, done.stdout
    # Options that take a value keep showing what it is.
    if command == ["devices", "list"]:
        assert "<int range>" in done.stdout


def test_shell_completion_is_offered(tmp_path: Path) -> None:
    done = run_mqttprov("--help", cwd=tmp_path)
    assert "--install-completion" in done.stdout
    assert "--show-completion" in done.stdout

    # The shell is detected from the process tree (shellingham): run it from bash.
    script = subprocess.run(
        ["bash", "-c", f"{shlex.quote(mqttprov_executable())} --show-completion"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert script.returncode == 0, script.stderr
    assert "_mqttprov_completion" in script.stdout
    assert "complete -o default -F _mqttprov_completion mqttprov" in script.stdout
