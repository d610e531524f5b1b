"""The pure parts of the Mosquitto integration: filter overlap, account rules, request identity, URLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli.accounts import keeps_logins_on_mosquitto
from broker.external.mosquitto.layout import (
    UnsafeRuleError,
    account_acls,
    check_external_rules,
    marker,
    overlaps,
    tag_of,
    worker_acls,
)
from config import Settings, load_settings
from provisioning.external.link import BrokerAddress, ExternalBrokerError, parse_broker_url
from provisioning.external.worker import identity_of_request, request_filter
from provisioning.topics import parse_rule
from tests.auth_support import hashed
from tests.helpers import write_config


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("#", "provision/reply/aa", True),
        ("+/#", "provision/reply/#", True),
        ("provision/+/aa", "provision/reply/#", True),
        ("+/+/+", "provision/reply/#", True),
        ("+/+", "provision/request", True),
        ("provision/reply", "provision/reply/#", True),  # '#' matches the parent level too
        ("provision", "provision/reply/#", False),
        ("devices/+/telemetry", "provision/reply/#", False),
        ("devices/#", "provision/request", False),
        ("+", "provision/request", False),
        ("$SYS/#", "provision/reply/#", False),
        ("a/b", "a/b/c", False),
        ("a/+/c", "a/b/+", True),
    ],
)
def test_overlaps(first: str, second: str, expected: bool) -> None:
    assert overlaps(first, second) is expected
    assert overlaps(second, first) is expected


@pytest.mark.parametrize(
    "rule", ["subscribe #", "subscribe +/reply/+", "publish provision/request", "subscribe +/+"]
)
def test_rules_reaching_provisioning_are_refused(rule: str) -> None:
    with pytest.raises(UnsafeRuleError, match="overlaps provision/"):
        check_external_rules([parse_rule(rule)])
    with pytest.raises(UnsafeRuleError):
        account_acls([parse_rule("subscribe devices/+/telemetry"), parse_rule(rule)])


def test_account_rules_become_allow_acls() -> None:
    acls = account_acls(
        [parse_rule("subscribe devices/+/telemetry"), parse_rule("publish devices/+/commands")]
    )
    assert {(a.acltype, a.topic, a.allow) for a in acls} == {
        ("subscribePattern", "devices/+/telemetry", True),
        ("publishClientReceive", "devices/+/telemetry", True),
        ("unsubscribePattern", "devices/+/telemetry", True),
        ("publishClientSend", "devices/+/commands", True),
    }


def test_worker_role_sends_replies_but_cannot_read_them() -> None:
    acls = worker_acls("mqttprov")
    assert {(a.acltype, a.topic) for a in acls} == {
        ("subscribeLiteral", "provision/request"),
        ("subscribeLiteral", "$share/mqttprov/provision/request"),
        ("publishClientReceive", "provision/request"),
        ("publishClientSend", "provision/reply/+"),
        ("publishClientSend", "mqttprov/events/device/+"),
    }
    assert request_filter("mqttprov") == "$share/mqttprov/provision/request"
    assert request_filter("") == "provision/request"


def test_the_marker_fingerprints_the_hash_and_never_carries_it() -> None:
    first, second = hashed("first-password-0001"), hashed("first-password-0001")
    assert tag_of(marker(first)) != tag_of(marker(second))  # another salt: another credential
    assert first not in marker(first)
    assert tag_of("operator's own client") is None
    assert tag_of(None) is None


@pytest.mark.parametrize(
    ("payload", "written"),
    [
        (json.dumps({"mac": "AA-BB-CC-00-00-01"}).encode(), "AA-BB-CC-00-00-01"),
        (json.dumps({"mac": "aabb.cc00.0001", "firmware_version": 7}).encode(), "aabb.cc00.0001"),
        (json.dumps({"mac": "aa:bb:cc:00:00:01-boot"}).encode(), None),
        (json.dumps({"mac": "provision/reply/#"}).encode(), None),
        (json.dumps({"mac": 12}).encode(), None),
        (json.dumps(["aa:bb:cc:00:00:01"]).encode(), None),
        (b"\xff\xfe", None),
        (b"{", None),
        (json.dumps({"mac": "aa:bb:cc:00:00:01", "pad": "x" * 5000}).encode(), None),
    ],
)
def test_identity_of_request(payload: bytes, written: str | None) -> None:
    identity = identity_of_request(payload, max_bytes=4096)
    if written is None:
        assert identity is None
    else:
        assert identity is not None
        assert identity.written == written
        assert identity.mac == "aa:bb:cc:00:00:01"


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://admin@broker.example:1884") == BrokerAddress(
        "broker.example", 1884, tls=False, username="admin"
    )
    assert parse_broker_url("mqtts://broker.example") == BrokerAddress("broker.example", 8883, tls=True)
    assert str(parse_broker_url("mqtts://u@[::1]:9")) == "mqtts://u@[::1]:9"
    for bad in ("http://x:1", "mqtt://", "mqtt://x:99999", "broker:1883"):
        with pytest.raises(ExternalBrokerError, match="invalid broker URL"):
            parse_broker_url(bad)
    with pytest.raises(ExternalBrokerError, match="not in the URL"):
        parse_broker_url("mqtt://admin:secret@x:1")


def test_external_settings_are_checked_and_masked() -> None:
    settings = Settings.model_validate({"external": {"admin_password": "s3cret", "shared_group": ""}})
    assert "s3cret" not in repr(settings.external)
    for bad in ({"broker": "tcp://x:1"}, {"shared_group": "a/b"}, {"on_revoke": "ignore"}):
        with pytest.raises(ValueError, match="external"):
            Settings.model_validate({"external": bad})


def test_a_mosquitto_deployment_is_one_that_configures_external(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default of external.credentials is "mosquitto" everywhere: only a configured
    # [external] (file or environment) makes `mqttprov accounts` act on Mosquitto too.
    bare = write_config(tmp_path / "bare.toml", {"broker": {"port": 1884}})
    external = write_config(tmp_path / "external.toml", {"external": {"broker": "mqtt://m:8883"}})
    registry = write_config(tmp_path / "registry.toml", {"external": {"credentials": "registry"}})
    assert not keeps_logins_on_mosquitto(load_settings(bare), bare)
    assert keeps_logins_on_mosquitto(load_settings(external), external)
    assert not keeps_logins_on_mosquitto(load_settings(registry), registry)
    monkeypatch.setenv("MQTTPROV_EXTERNAL__ADMIN_PASSWORD", "secret-0010")
    assert keeps_logins_on_mosquitto(load_settings(bare), bare)
    assert not keeps_logins_on_mosquitto(load_settings(registry), registry)
