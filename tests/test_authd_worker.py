"""Which worker settings ``mqttprov worker`` refuses, per ``[external] credentials``.

The worker itself runs against the real RabbitMQ cluster in tests/test_authd_rabbitmq.py; these
are the refusals that come before any connection, through the real CLI where the wording matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.external.worker import check_worker_settings
from config import Settings
from provisioning.external.link import ExternalBrokerError
from tests.helpers import broker_settings, run_mqttprov

PASSWORD = "worker-password-0007"


def settings(tmp_path: Path, *, provisioning: dict[str, Any] | None = None, **external: Any) -> Settings:
    """Registry-mode worker settings with a password, these keys on top."""
    base = broker_settings(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    section = {"credentials": "registry", "worker_username": "mqttprov_worker", "worker_password": PASSWORD}
    data = base.model_dump() | {"external": section | external}
    if provisioning is not None:
        data["provisioning"] = provisioning
    return Settings.model_validate(data)


def test_existing_configs_keep_the_mosquitto_hand_over() -> None:
    assert Settings().external.credentials == "mosquitto"
    with pytest.raises(ValidationError, match="credentials"):
        Settings.model_validate({"external": {"credentials": "rabbitmq"}})


def test_registry_mode_accepts_every_proof_authd_checks(tmp_path: Path) -> None:
    fleet = {"auth": "fleet_secret", "fleet_secret": "fleet-secret-0007"}
    key = {"auth": "device_key", "device_key_secret": "device-key-secret-0007", "reprovision": "reject"}
    for provisioning in (None, fleet, key):
        check_worker_settings(settings(tmp_path, provisioning=provisioning))  # does not raise


def test_what_nobody_can_enforce_is_refused(tmp_path: Path) -> None:
    key = {"auth": "device_key", "device_key_secret": "device-key-secret-0007"}
    with pytest.raises(ExternalBrokerError, match="reprovision = 'reject'"):
        check_worker_settings(settings(tmp_path, provisioning=key | {"reprovision": "reissue"}))
    with pytest.raises(ExternalBrokerError, match="cannot be enforced on Mosquitto"):
        check_worker_settings(settings(tmp_path, provisioning=key, credentials="mosquitto"))
    with pytest.raises(ExternalBrokerError, match="not a service account name"):
        check_worker_settings(settings(tmp_path, worker_username="device_worker"))
    with pytest.raises(ExternalBrokerError, match="worker_password is not set"):
        check_worker_settings(settings(tmp_path, worker_password=None))


def test_the_cli_refuses_in_one_line_before_connecting(tmp_path: Path) -> None:
    config = tmp_path / "mqttprov.toml"
    sections = {
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"},
        "provisioning": {"auth": "device_key", "reprovision": "reissue"},
        # Port 9 (discard): nothing may be dialled before the settings are refused.
        "external": {"credentials": "registry", "broker": "mqtt://127.0.0.1:9", "worker_username": "w"},
    }
    config.write_text(
        "".join(
            f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
            for name, values in sections.items()
        ),
        encoding="utf-8",
    )
    env = {
        "MQTTPROV_EXTERNAL__WORKER_PASSWORD": PASSWORD,
        "MQTTPROV_PROVISIONING__DEVICE_KEY_SECRET": "device-key-secret-0007",
    }
    done = run_mqttprov("worker", "--config", str(config), cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: provisioning.auth = 'device_key' with reprovision = 'reissue'")
    assert PASSWORD not in done.stdout + done.stderr
