"""The package as a user gets it: the wheel built from the sdist, installed into a fresh venv outside
the checkout, and ``mqttprov serve`` started from there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import connack_code, free_port, write_config
from tests.test_deploy import started
from tests.test_serve import NOT_AUTHORIZED

# slow, the whole file: builds and installs the wheel into a fresh venv.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
#: What pip and build print when the package index cannot be reached: a skip, not a failure.
OFFLINE_SIGNS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Could not find a version that satisfies the requirement",
    "No matching distribution found",
)


def _run(*args: str | Path, cwd: Path, timeout: float = 480) -> subprocess.CompletedProcess[str]:
    """Run a packaging step; skip the test when it failed because the index is unreachable."""
    done = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0 and any(sign in output for sign in OFFLINE_SIGNS):
        pytest.skip(f"the package index is unreachable: {args[:3]} failed offline")
    assert done.returncode == 0, output
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel built from this checkout's sdist."""
    base = tmp_path_factory.mktemp("packaging")
    dist = base / "dist"
    # Without --wheel: the sdist first, then the wheel from it (so the sdist is complete), and
    # nothing written into the checkout (a wheel built from the tree would leave build/ there).
    _run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=base)
    (wheel,) = dist.glob("mqttprov-*.whl")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=base)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=base)
    return venv


@pytest.mark.timeout(900)
def test_wheel_installs_with_its_licence_and_entry_point(installed: Path, tmp_path: Path) -> None:
    where = _run(
        installed / "bin" / "python",
        "-c",
        "import broker, importlib.metadata as m; d = m.distribution('mqttprov'); "
        "print(broker.__file__); print(d.metadata['License-Expression']); "
        "print(sorted(f.name for f in d.files or [] if 'licenses' in str(f)))",
        cwd=tmp_path,
    ).stdout.splitlines()

    assert Path(where[0]).is_relative_to(installed), where  # not this checkout
    assert where[1:] == ["MIT", "['LICENSE']"]
    version = _run(installed / "bin" / "mqttprov", "--version", cwd=tmp_path)
    assert version.stdout == "mqttprov 0.1.0\n"


@pytest.mark.timeout(900)
async def test_installed_mqttprov_serves_and_stops(installed: Path, tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "registry.db"
    config = write_config(
        tmp_path / "mqttprov.toml",
        {
            "broker": {"host": "127.0.0.1", "port": port},
            "database": {"url": f"sqlite+aiosqlite:///{database}"},
            "auth": {"bcrypt_cost": 4},
        },
    )
    command = ("serve", "--config", str(config))
    async with started(
        installed / "bin" / "mqttprov", *command, cwd=tmp_path, ready="broker started"
    ) as served:
        assert await asyncio.to_thread(connack_code, "127.0.0.1", port) == NOT_AUTHORIZED
        assert await served.stop(signal.SIGTERM) == 0
    assert database.is_file()
    assert served.messages[-1] == "broker stopped"
    assert not any("Traceback" in line for line in served.lines), served.lines
