"""Keyed credential verifiers: a restart is not a bcrypt storm, and no key fault ever accepts a login.

Brokers run in-process on a free loopback port and are stopped and started again on the same
database, as an operator's restart does; clients are raw sockets called from threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import update

from auth_plugin.authenticator import Authenticator, ConnectAttempt
from auth_plugin.principals import credential_tag
from auth_plugin.verifiers import KEY_FILE_NAME, VerifierKey, default_key_file
from broker.core import auth_core
from broker.embedded import BrokerServer
from config import Settings
from provisioning.registry import DeviceInfo, DeviceRegistry, create_engine
from provisioning.registry.migrate import upgrade
from provisioning.registry.models import Device
from provisioning.registry.verifiers import VerifierStore
from tests.auth_support import (
    ACCOUNT_PASSWORD,
    PASSWORD,
    eventually,
    hashed,
    login_code,
    make_account,
    make_device,
    polled,
    settings,
    stored_hash,
)

ACCEPTED, BAD_CREDENTIALS = 0, 4
KEY = "0123456789abcdef" * 4
OTHER_KEY = "fedcba9876543210" * 4


@asynccontextmanager
async def running(config: Settings) -> AsyncIterator[BrokerServer]:
    """A broker on ``config`` whose background verifier writes are done before it is left."""
    async with BrokerServer(config) as server:
        yield server
        await authenticator(server).settle()


def authenticator(server: BrokerServer) -> Authenticator:
    return server.services.authenticator


async def login(server: BrokerServer, username: str, password: str = PASSWORD) -> int:
    port = server.settings.broker.port
    return await asyncio.to_thread(login_code, port, username, username=username, password=password)


def counts(server: BrokerServer) -> tuple[int, int]:
    """(bcrypt checks, stored-verifier checks: the verifier read with the credential, or loaded
    at start and answered from memory) of this broker process so far."""
    stats = authenticator(server).stats
    return stats.bcrypt_checks, stats.verifier_checks + stats.cache_hits


def with_auth(config: Settings, **auth: object) -> Settings:
    return Settings.model_validate(config.model_dump() | {"auth": config.auth.model_dump() | auth})


async def stored_verifiers(server: BrokerServer) -> int:
    return await VerifierStore(server.registry.engine).count()


# -- restarts ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_after_a_restart_known_credentials_are_checked_by_their_verifier_not_bcrypt(
    database_url: str,
) -> None:
    config = settings(database_url, verifier_key=KEY)
    async with running(config) as first:
        device = await make_device(first.registry, "02:00:00:00:0c:01")
        await make_account(first.accounts, "backend", ["subscribe devices/+/telemetry"])
        assert await login(first, device.mqtt_username) == ACCEPTED
        assert await login(first, "backend", ACCOUNT_PASSWORD) == ACCEPTED
        assert counts(first) == (2, 0)
    async with running(config) as second:
        assert await login(second, device.mqtt_username) == ACCEPTED
        assert await login(second, "backend", ACCOUNT_PASSWORD) == ACCEPTED
        assert await login(second, device.mqtt_username, "wrong-password") == BAD_CREDENTIALS
        assert await login(second, "backend", "wrong-password") == BAD_CREDENTIALS
        # Not one bcrypt run: the acceptances come from the verifiers loaded at start (no registry
        # read), the refusals from the verifiers read with the credential.
        assert counts(second) == (0, 4)
        assert authenticator(second).stats.cache_hits == 2


async def test_the_key_file_is_made_once_beside_the_sqlite_database_with_mode_0600(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="auth_plugin.verifiers")
    key_file = tmp_path / KEY_FILE_NAME
    assert default_key_file(sqlite_url) == key_file
    config = settings(sqlite_url)
    async with running(config) as first:
        device = await make_device(first.registry, "02:00:00:00:0c:02")
        assert await login(first, device.mqtt_username) == ACCEPTED
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    made = [r.getMessage() for r in caplog.records if "created the credential verifier key" in r.getMessage()]
    expected = f"created the credential verifier key {key_file} (mode 0600); every process on this registry"
    assert made == [expected + " must use it"]
    key = key_file.read_text()
    async with running(config) as second:
        assert await login(second, device.mqtt_username) == ACCEPTED
        assert counts(second) == (0, 1)
    assert key_file.read_text() == key  # read again, not made again
    assert len([r for r in caplog.records if "created the credential" in r.getMessage()]) == 1


async def test_a_lost_or_changed_key_falls_back_to_bcrypt_and_never_accepts_a_wrong_password(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(sqlite_url)
    async with running(config) as first:
        device = await make_device(first.registry, "02:00:00:00:0c:03")
        assert await login(first, device.mqtt_username) == ACCEPTED
    (tmp_path / KEY_FILE_NAME).unlink()  # lost: a new key is made, the stored verifier is foreign
    async with running(config) as second:
        assert await login(second, device.mqtt_username, "wrong-password") == BAD_CREDENTIALS
        assert await login(second, device.mqtt_username) == ACCEPTED
        assert counts(second) == (2, 0)
    assert "was made under another key" in caplog.text
    # The verifier was made again under the new key: the next restart uses it.
    async with running(config) as third:
        assert await login(third, device.mqtt_username) == ACCEPTED
        assert counts(third) == (0, 1)
    # Changed by configuration: the same again.
    async with running(with_auth(config, verifier_key=OTHER_KEY)) as fourth:
        assert await login(fourth, device.mqtt_username, "wrong-password") == BAD_CREDENTIALS
        assert await login(fourth, device.mqtt_username) == ACCEPTED
        assert counts(fourth) == (2, 0)


@pytest.mark.parametrize("fault", ["open to others", "a directory", "not a key", "no folder to make it in"])
async def test_an_unusable_key_file_turns_verifiers_off_with_one_error_line(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    key_file = tmp_path / "keys" / KEY_FILE_NAME
    key_file.parent.mkdir()
    config = with_auth(settings(sqlite_url), verifier_key_file=key_file)
    async with running(config) as first:  # a good key first: the device gets a verifier under it
        device = await make_device(first.registry, "02:00:00:00:0c:04")
        assert await login(first, device.mqtt_username) == ACCEPTED
    if fault == "open to others":
        key_file.chmod(0o644)
    elif fault == "a directory":
        key_file.unlink()
        key_file.mkdir()
    elif fault == "not a key":
        key_file.write_text("not-hex\n")
    else:
        key_file.unlink()
        key_file.parent.rmdir()
    caplog.clear()
    async with running(config) as second:
        assert await login(second, device.mqtt_username, "wrong-password") == BAD_CREDENTIALS
        assert await login(second, device.mqtt_username) == ACCEPTED
        assert counts(second) == (2, 0)
        assert authenticator(second).verifier_key is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "auth_plugin.verifiers"]
    assert len(errors) == 1
    assert (
        errors[0].getMessage().startswith("credential verifiers are off, every login is checked with bcrypt")
    )
    assert str(key_file) in errors[0].getMessage()


async def test_a_postgres_registry_without_a_configured_key_uses_no_verifiers(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(settings(postgres_url)) as server:
        device = await make_device(server.registry, "02:00:00:00:0c:05")
        assert await login(server, device.mqtt_username) == ACCEPTED
        assert authenticator(server).verifier_key is None
        assert await stored_verifiers(server) == 0
    assert "credential verifiers are off" in caplog.text


# -- revocation -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_every_credential_change_deletes_its_verifier_in_the_same_transaction(
    database_url: str,
) -> None:
    async with running(settings(database_url, verifier_key=KEY)) as server:
        devices = [await make_device(server.registry, f"02:00:00:00:0d:0{i}") for i in range(3)]
        await make_account(server.accounts, "rotated", ["subscribe devices/+/telemetry"])
        await make_account(server.accounts, "removed", ["subscribe devices/+/telemetry"])
        for device in devices:
            assert await login(server, device.mqtt_username) == ACCEPTED
        for name in ("rotated", "removed"):
            assert await login(server, name, ACCOUNT_PASSWORD) == ACCEPTED
        await authenticator(server).settle()
        assert await stored_verifiers(server) == 5
        await server.registry.reset(devices[0].id)
        await server.registry.decommission(devices[1].id)
        await server.registry.delete(devices[2].id)
        await server.accounts.rotate("rotated", hashed("a-new-password"))
        await server.accounts.remove("removed")
        assert await stored_verifiers(server) == 0


async def test_a_verifier_left_from_an_earlier_credential_never_accepts(sqlite_url: str) -> None:
    # A verifier's row names the credential it was made for: if one outlived its credential (a
    # change made around the registry, by hand), it is ignored, never trusted.
    config = settings(sqlite_url)
    async with running(config) as first:
        device = await make_device(first.registry, "02:00:00:00:0c:06")
        assert await login(first, device.mqtt_username) == ACCEPTED
        async with first.registry.engine.begin() as conn:
            await conn.execute(
                update(Device).where(Device.id == device.id).values(password_hash=hashed("new-password"))
            )
    async with running(config) as second:
        assert await login(second, device.mqtt_username) == BAD_CREDENTIALS  # the old password
        assert await login(second, device.mqtt_username, "new-password") == ACCEPTED
        assert counts(second) == (2, 0)


@pytest.mark.slow
async def test_a_decommission_while_the_broker_is_down_holds_after_the_restart(database_url: str) -> None:
    config = settings(database_url, verifier_key=KEY)
    async with running(config) as first:
        device = await make_device(first.registry, "02:00:00:00:0c:07")
        assert await login(first, device.mqtt_username) == ACCEPTED
    async with running(config) as second:
        await second.registry.decommission(device.id)
    async with running(config) as third:
        assert await login(third, device.mqtt_username) == BAD_CREDENTIALS


# -- what the database holds -------------------------------------------------------------------------


async def _logged_in_once(sqlite_url: str) -> tuple[DeviceInfo, str, str]:
    """A device that logged in once: (device, its stored hash, its stored digest)."""
    async with running(settings(sqlite_url)) as server:
        device = await make_device(server.registry, "02:00:00:00:0c:08")
        assert await login(server, device.mqtt_username) == ACCEPTED
        await authenticator(server).settle()
        record = await server.registry.find_credentials_by_username(device.mqtt_username)
    assert record is not None
    assert record.password_hash is not None
    assert record.verifier is not None
    return device, record.password_hash, record.verifier.digest


async def test_a_database_dump_alone_cannot_check_a_password(sqlite_url: str, tmp_path: Path) -> None:
    device, stored_hash, digest = await _logged_in_once(sqlite_url)
    dump = (tmp_path / "registry.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("registry.db-*")
    )
    key = (tmp_path / KEY_FILE_NAME).read_text().strip().encode()
    assert key not in dump
    assert bytes.fromhex(key.decode()) not in dump
    assert PASSWORD.encode() not in dump
    assert digest.encode() in dump  # the verifier is there, and useless without the key:
    username = device.mqtt_username
    material = "\x00".join((username, stored_hash, PASSWORD)).encode()
    unkeyed = [hashlib.sha256(material).hexdigest(), hashlib.sha256(b"mqttprov-verifier-v1\x00" + material)]
    assert digest not in unkeyed
    for guess in (b"", b"\x00" * 32, KEY.encode()):
        assert VerifierKey(guess).digest(username, stored_hash, PASSWORD) != digest
    assert VerifierKey(key).digest(username, stored_hash, PASSWORD) == digest
    assert credential_tag(stored_hash) != digest


async def test_the_key_file_text_given_as_verifier_key_is_the_same_key(
    sqlite_url: str, tmp_path: Path
) -> None:
    # How a move to PostgreSQL (or a second process elsewhere) keeps the verifiers already made.
    async with running(settings(sqlite_url)) as first:
        device = await make_device(first.registry, "02:00:00:00:0c:09")
        assert await login(first, device.mqtt_username) == ACCEPTED
    text = (tmp_path / KEY_FILE_NAME).read_text().strip()
    (tmp_path / KEY_FILE_NAME).unlink()
    async with running(settings(sqlite_url, verifier_key=text)) as second:
        assert await login(second, device.mqtt_username) == ACCEPTED
        assert counts(second) == (0, 1)
    assert not (tmp_path / KEY_FILE_NAME).exists()  # a configured key makes no file


# -- loaded at start ---------------------------------------------------------------------------------


async def test_a_restarted_broker_answers_the_fleet_from_the_verifiers_it_loaded(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(database_url, verifier_key=KEY)
    async with running(config) as first:
        devices = [await make_device(first.registry, f"02:00:00:00:10:0{i}") for i in range(3)]
        for device in devices:
            assert await login(first, device.mqtt_username) == ACCEPTED
    async with running(config) as second:
        assert len(authenticator(second).cache) == 3

        async def unread(*_: object) -> None:  # fault: any registry read of a credential fails
            raise AssertionError("a login read the registry")

        monkeypatch.setattr(second.registry, "find_credentials_by_username", unread)
        for device in devices:
            assert await login(second, device.mqtt_username) == ACCEPTED
        assert await login(second, devices[0].mqtt_username, PASSWORD) == ACCEPTED
        assert authenticator(second).stats.cache_hits == 4


async def test_a_change_made_after_the_start_drops_what_was_loaded(sqlite_url: str) -> None:
    config = settings(sqlite_url)
    async with running(config) as first:
        device = await make_device(first.registry, "02:00:00:00:10:08")
        assert await login(first, device.mqtt_username) == ACCEPTED
    async with running(config) as second:
        tag = credential_tag(await stored_hash(second, device))
        assert authenticator(second).cache.holds(device.mqtt_username, tag)
        # Another process (its own engine: this broker learns it from the change feed only).
        other = DeviceRegistry(create_engine(sqlite_url))
        try:
            await other.decommission(device.id)
        finally:
            await other.close()
        await eventually(
            polled(lambda: authenticator(second).cache.holds(device.mqtt_username, tag)),
            lambda held: not held,
        )
        assert await login(second, device.mqtt_username) == BAD_CREDENTIALS


async def test_verifiers_for_an_earlier_credential_or_another_key_are_not_loaded(sqlite_url: str) -> None:
    config = settings(sqlite_url)
    async with running(config) as first:
        changed = await make_device(first.registry, "02:00:00:00:10:09")
        kept = await make_device(first.registry, "02:00:00:00:10:0a")
        for device in (changed, kept):
            assert await login(first, device.mqtt_username) == ACCEPTED
        async with first.registry.engine.begin() as conn:  # around the registry: no change feed
            await conn.execute(
                update(Device).where(Device.id == changed.id).values(password_hash=hashed("new-password"))
            )
    async with running(config) as second:
        assert len(authenticator(second).cache) == 1  # the kept one
    async with running(with_auth(config, verifier_key=OTHER_KEY)) as third:
        assert len(authenticator(third).cache) == 0


async def test_a_login_that_read_the_registry_before_a_revocation_is_not_cached_after_it(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: the login's registry read returns the credential, the decommission commits and
    # its change drops the cache entry, then the login resumes. Its entry must not come back, so
    # that the session it opens is checked against the registry again when it goes live.
    core = auth_core(settings(sqlite_url))
    await upgrade(core.registry.engine)
    try:
        device = await make_device(core.registry, "02:00:00:00:10:0b")
        user = device.mqtt_username
        tag = credential_tag(hashed_of(await core.registry.find_credentials_by_username(user)))
        read = core.registry.find_credentials_by_username

        async def read_then_revoked(username: str) -> object:  # fault: a revocation lands mid-read
            found = await read(username)
            await core.registry.decommission(device.id)
            core.authenticator.cache.drop(username)  # what the change follower does with it
            return found

        monkeypatch.setattr(core.registry, "find_credentials_by_username", read_then_revoked)
        decision = await core.authenticator.authenticate(ConnectAttempt(user, user, PASSWORD))
        assert decision.accepted  # decided on what it read; the live session is checked again:
        assert not core.authenticator.cache.holds(user, tag)
    finally:
        await core.close()


def hashed_of(record: object) -> str:
    password_hash = getattr(record, "password_hash", None)
    assert isinstance(password_hash, str)
    return password_hash
