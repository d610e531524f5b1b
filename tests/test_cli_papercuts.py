"""What a new user tripped over in the CLI (issue 17), each through the installed ``mqttprov``."""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

from broker.embedded import BrokerServer
from config import load_settings
from tests.helpers import free_port, mqttprov_executable, run_mqttprov, write_config

# slow, the whole file: runs the installed mqttprov for every step.
pytestmark = pytest.mark.slow


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


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    """A config file on this test's own SQLite database, migrated."""
    config = write_config(tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}})
    done = run_mqttprov("db", "upgrade", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return config


def one_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command exited ``code`` with one stderr line, which starts with ``error:``."""
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["devices", "add", "nonsense"],
        ["devices", "add", "aa:bb:cc:dd:ee"],
        ["keys", "derive", "nonsense"],
        ["provision-device", "--mac", "nonsense", "--host", "127.0.0.1", "--port", "1"],
    ],
)
def test_a_bad_mac_argument_is_a_usage_error(tmp_path: Path, config_file: Path, command: list[str]) -> None:
    env = {"MQTTPROV_PROVISIONING__DEVICE_KEY_SECRET": "s" * 32}

    line = one_error(run_mqttprov(*command, "--config", str(config_file), cwd=tmp_path, env=env), 2)

    assert line.startswith("error: not a MAC address: ")


def test_devices_show_says_what_it_accepts(tmp_path: Path, config_file: Path) -> None:
    done = run_mqttprov("devices", "show", "nosuch", "--config", str(config_file), cwd=tmp_path)

    assert one_error(done, 1) == (
        "error: no device matches 'nosuch' (give a device id, a MAC address or a username)"
    )


def test_errors_carry_the_prefix(tmp_path: Path, config_file: Path) -> None:
    added = run_mqttprov("devices", "add", "aa:bb:cc:dd:ee:01", "--config", str(config_file), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    no_secret = run_mqttprov(
        "keys", "derive", "aa:bb:cc:dd:ee:01", "--config", str(config_file), cwd=tmp_path
    )
    not_asked = run_mqttprov(
        "devices", "delete", "aa:bb:cc:dd:ee:01", "--config", str(config_file), cwd=tmp_path
    )

    assert one_error(no_secret, 2) == "error: provisioning.device_key_secret is not set"
    assert one_error(not_asked, 2).startswith("error: refusing to ask for confirmation")


def test_approving_an_approved_device_changes_nothing(tmp_path: Path, config_file: Path) -> None:
    mac = "aa:bb:cc:dd:ee:02"
    added = run_mqttprov("devices", "add", mac, "--config", str(config_file), cwd=tmp_path)
    assert added.returncode == 0, added.stderr

    again = run_mqttprov("devices", "approve", mac, "--config", str(config_file), cwd=tmp_path)
    as_json = run_mqttprov("devices", "approve", mac, "--json", "--config", str(config_file), cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert again.stdout.endswith(f"({mac}) is approved already: nothing changed\n")
    assert again.stderr == ""
    assert json.loads(as_json.stdout)["status"] == "approved"
    events = run_mqttprov("devices", "show", mac, "--json", "--config", str(config_file), cwd=tmp_path)
    assert [e["kind"] for e in json.loads(events.stdout)["events"]].count("approved") == 0


def test_serve_on_a_taken_port_names_the_setting(tmp_path: Path, sqlite_url: str) -> None:
    # As the README's first screen has it: the port from the environment, no config file.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        env = {
            "MQTTPROV_BROKER__HOST": "127.0.0.1",
            "MQTTPROV_BROKER__PORT": str(taken.getsockname()[1]),
            "MQTTPROV_DATABASE__URL": sqlite_url,
        }
        done = run_mqttprov("serve", cwd=tmp_path, env=env)

    assert done.returncode == 1
    # INFO and WARNING lines come first (serve logs); the error is the one last line.
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.stderr.splitlines()[-1] == error
    assert "address already in use" in error
    assert error.endswith(
        "(set another: [broker] port in the config file or MQTTPROV_BROKER__PORT; "
        "tls_port and ws_port likewise)"
    )


# -- provision-device ------------------------------------------------------------------------------


async def test_provision_device_reads_the_broker_from_config_and_says_pending(
    tmp_path: Path, sqlite_url: str
) -> None:
    port = free_port()
    sections: dict[str, dict[str, str | int | Path]] = {
        "broker": {"host": "127.0.0.1", "port": port},
        "database": {"url": sqlite_url},
        "auth": {"bcrypt_cost": 4},
        # One request a minute per MAC after the first: the device's second request is
        # RATE_LIMITED although the device is pending.
        "provisioning": {
            "mode": "approval",
            "pending_retry_after": 1,
            "mac_burst": 1,
            "mac_requests_per_minute": 1,
        },
    }
    config = write_config(tmp_path / "mqttprov.toml", sections)
    settings = load_settings(config)
    mac = "aa:bb:cc:dd:ee:10"
    async with BrokerServer(settings):
        done = await asyncio.to_thread(
            run_mqttprov,
            *("provision-device", "--mac", mac, "--attempts", "2", "--deadline", "30", "--timeout", "5"),
            *("--config", str(config)),
            cwd=tmp_path,
        )
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[0].startswith(f"{mac}: pending; asking again in ")
    assert lines[-1] == (
        f"error: PENDING: {mac} is waiting for an operator's approval; gave up after 2 requests "
        f"(approve it with: mqttprov devices approve {mac})"
    )
    assert "RATE_LIMITED" not in lines[-1]


def test_provision_device_options_are_checked(tmp_path: Path) -> None:
    base = ("provision-device", "--mac", "aa:bb:cc:dd:ee:11", "--host", "127.0.0.1", "--port", "1")

    assert run_mqttprov(*base, "--attempts", "0", cwd=tmp_path).returncode == 2
    assert run_mqttprov(*base, "--deadline", "0", cwd=tmp_path).returncode == 2
    refused = run_mqttprov(*base, "--attempts", "1", "--timeout", "2", cwd=tmp_path)
    assert one_error(refused, 1).startswith("error: CONNECTION_FAILED: ")
