"""API tokens on SQLite and PostgreSQL: created once, stored as digests, refused at once when revoked;
and ``mqttprov tokens`` from the command line."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner, Result

from broker.cli import app
from provisioning.registry import (
    Scope,
    TokenError,
    TokenExistsError,
    TokenNotFoundError,
    TokenStore,
    create_engine,
)
from provisioning.registry import tokens as tokens_module
from provisioning.registry.migrate import alembic_config, upgrade
from provisioning.registry.models import ApiToken
from provisioning.registry.schemas import aware
from provisioning.registry.tokens import SECRET_PREFIX, secret_digest
from tests.helpers import preserved_logging, write_config

READ_WRITE = frozenset({Scope.READ, Scope.WRITE})


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[TokenStore]:
    """A token store on a migrated, empty database of this test's own."""
    engine = create_engine(database_url)
    await upgrade(engine)
    tokens = TokenStore(engine)
    try:
        yield tokens
    finally:
        await tokens.close()


@pytest.fixture
async def other_process(store: TokenStore, database_url: str) -> AsyncIterator[TokenStore]:
    """A second store on the same database through an engine of its own, as another process has."""
    tokens = TokenStore(create_engine(database_url))
    try:
        yield tokens
    finally:
        await tokens.close()


async def stored_rows(engine: AsyncEngine) -> list[ApiToken]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(ApiToken.__table__))).all()
    return [ApiToken(**row._mapping) for row in rows]


# -- create, list, authenticate -----------------------------------------------------------------


async def test_create_shows_the_secret_once_and_stores_only_its_digest(store: TokenStore) -> None:
    issued = await store.create("ci-deploy", READ_WRITE)

    assert issued.secret.startswith(SECRET_PREFIX)
    assert len(issued.secret) == len(SECRET_PREFIX) + 43
    assert issued.secret not in repr(issued)
    assert issued.token.name == "ci-deploy"
    assert issued.token.scopes == READ_WRITE
    assert issued.token.last_used_at is None
    (row,) = await stored_rows(store.engine)
    assert row.digest == secret_digest(issued.secret)
    assert issued.secret not in str(vars(row))
    assert row.scopes == ["read", "write"]
    assert await store.list() == [issued.token]


async def test_authenticate_finds_the_token_and_its_scopes(store: TokenStore) -> None:
    writer = await store.create("writer", frozenset({Scope.WRITE}))
    await store.create("reader", frozenset({Scope.READ}))

    found = await store.authenticate(writer.secret)

    assert found is not None
    assert found.id == writer.token.id
    assert found.allows(Scope.WRITE)
    # Explicit scopes: write does not imply read.
    assert not found.allows(Scope.READ)
    assert not found.allows(Scope.PROVISION)


@pytest.mark.parametrize(
    "secret",
    [
        "",
        SECRET_PREFIX,
        "Bearer " + SECRET_PREFIX + "A" * 43,
        SECRET_PREFIX + "A" * 42,
        SECRET_PREFIX + "A" * 44,
        SECRET_PREFIX + "A" * 42 + "é",
        "xyz_" + "A" * 43,
    ],
)
async def test_malformed_secrets_are_refused(store: TokenStore, secret: str) -> None:
    await store.create("any", frozenset(Scope))

    assert await store.authenticate(secret) is None


async def test_unknown_secret_is_refused(store: TokenStore) -> None:
    issued = await store.create("any", frozenset(Scope))
    unknown = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")

    assert await store.authenticate(unknown) is None


async def test_list_is_by_name_and_never_shows_a_secret(store: TokenStore) -> None:
    b = await store.create("b", frozenset({Scope.PROVISION}))
    a = await store.create("a", frozenset({Scope.READ}))

    listed = await store.list()

    assert [t.name for t in listed] == ["a", "b"]
    dumped = json.dumps([t.model_dump(mode="json") for t in listed])
    assert a.secret not in dumped
    assert b.secret not in dumped
    assert json.loads(dumped)[0]["scopes"] == ["read"]


async def test_names_are_unique(store: TokenStore) -> None:
    await store.create("ci", frozenset({Scope.READ}))

    with pytest.raises(TokenExistsError, match="'ci' already exists"):
        await store.create("ci", frozenset({Scope.WRITE}))


@pytest.mark.parametrize(
    "name", ["", "1ci", "-ci", "c i", "ci/prod", "c" * 65, "é", str(uuid.uuid4()), "ci\n"]
)
async def test_invalid_names_are_refused(store: TokenStore, name: str) -> None:
    with pytest.raises(TokenError, match="invalid token name"):
        await store.create(name, frozenset({Scope.READ}))

    assert await store.list() == []


async def test_a_token_needs_a_scope(store: TokenStore) -> None:
    with pytest.raises(TokenError, match="at least one of read, write, provision"):
        await store.create("none", frozenset())


# -- revocation ---------------------------------------------------------------------------------


async def test_revoked_token_is_refused_at_once_in_every_process(
    store: TokenStore, other_process: TokenStore
) -> None:
    issued = await store.create("ci", READ_WRITE)
    assert await other_process.authenticate(issued.secret) is not None

    revoked = await store.revoke("ci")

    assert revoked.id == issued.token.id
    assert await store.authenticate(issued.secret) is None
    assert await other_process.authenticate(issued.secret) is None
    assert await store.list() == []


async def test_revoke_by_id_and_reuse_the_name(store: TokenStore) -> None:
    first = await store.create("ci", READ_WRITE)

    await store.revoke(str(first.token.id))
    second = await store.create("ci", frozenset({Scope.READ}))

    assert await store.authenticate(first.secret) is None
    found = await store.authenticate(second.secret)
    assert found is not None
    assert found.scopes == {Scope.READ}


async def test_revoke_unknown_token(store: TokenStore) -> None:
    with pytest.raises(TokenNotFoundError, match="no API token"):
        await store.revoke("ghost")
    with pytest.raises(TokenNotFoundError):
        await store.revoke(uuid.uuid4())


# -- last use -----------------------------------------------------------------------------------


async def test_last_use_is_written_at_most_once_a_minute(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = await store.create("ci", READ_WRITE)
    now = issued.token.created_at + timedelta(seconds=5)
    monkeypatch.setattr(tokens_module, "utcnow", lambda: now)

    first = await store.authenticate(issued.secret)
    assert first is not None
    assert first.last_used_at == now
    (row,) = await stored_rows(store.engine)
    assert row.last_used_at is not None

    later = now
    now = later + timedelta(seconds=30)
    await store.authenticate(issued.secret)
    (row,) = await stored_rows(store.engine)
    assert _aware(row.last_used_at) == later

    now = later + timedelta(seconds=61)
    again = await store.authenticate(issued.secret)
    assert again is not None
    assert again.last_used_at == now
    assert (await store.list())[0].last_used_at == now


def _aware(value: datetime | None) -> datetime | None:
    return aware(value)


async def test_secrets_are_never_logged(store: TokenStore, caplog: pytest.LogCaptureFixture) -> None:
    # Our loggers: a driver's DEBUG output shows bound parameters (the digest, never the secret).
    with caplog.at_level(logging.DEBUG, logger="provisioning"):
        issued = await store.create("ci", READ_WRITE)
        await store.authenticate(issued.secret)
        await store.revoke("ci")

    assert "api token created name=ci" in caplog.text
    assert "api token revoked name=ci" in caplog.text
    assert issued.secret not in caplog.text
    assert secret_digest(issued.secret) not in caplog.text


# -- migration ----------------------------------------------------------------------------------


async def test_migration_0007_upgrades_and_downgrades(store: TokenStore) -> None:
    engine = store.engine

    def tables(conn: Connection) -> set[str]:
        return set(inspect(conn).get_table_names())

    def downgrade(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")

    async with engine.begin() as conn:
        assert "api_tokens" in await conn.run_sync(tables)
        await conn.run_sync(downgrade)
        assert "api_tokens" not in await conn.run_sync(tables)
    await upgrade(engine, "0007")
    issued = await store.create("after", frozenset({Scope.READ}))
    assert await store.authenticate(issued.secret) is not None


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with preserved_logging():
        yield


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    path = write_config(tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}})
    assert invoke("db", "upgrade", "--config", str(path)).exit_code == 0
    return path


def test_cli_create_list_revoke(config_file: Path) -> None:
    config = ("--config", str(config_file))
    created = invoke("tokens", "create", "ci", "--scope", "read", "-s", "WRITE", "--json", *config)
    assert created.exit_code == 0, created.output
    data = json.loads(created.stdout)
    assert data["name"] == "ci"
    assert data["scopes"] == ["read", "write"]
    assert data["secret"].startswith(SECRET_PREFIX)

    listed = invoke("tokens", "list", "--json", *config)
    assert listed.exit_code == 0, listed.output
    assert data["secret"] not in listed.stdout
    (token,) = json.loads(listed.stdout)["tokens"]
    assert token["id"] == data["id"]
    assert "secret" not in token
    table = invoke("tokens", "list", *config)
    assert "ci" in table.stdout
    assert "read, write" in table.stdout
    assert "never" in table.stdout

    revoked = invoke("tokens", "revoke", "ci", *config)
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked API token 'ci' ({data['id']})" in revoked.stdout
    assert json.loads(invoke("tokens", "list", "--json", *config).stdout) == {"tokens": []}


def test_cli_create_prints_the_secret_once_for_people(config_file: Path) -> None:
    result = invoke("tokens", "create", "ops", "--scope", "provision", "--config", str(config_file))

    assert result.exit_code == 0, result.output
    assert "created API token 'ops' (provision)" in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("secret: ")]
    assert line.removeprefix("secret: ").startswith(SECRET_PREFIX)
    assert "shown once" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ci", "--scope", "admin"), "error: 'admin' is not a valid Scope (scopes: read, write, provision)"),
        (("1ci", "--scope", "read"), "error: invalid token name '1ci'"),
    ],
)
def test_cli_create_refuses_bad_input_with_exit_2(
    config_file: Path, args: tuple[str, ...], message: str
) -> None:
    result = invoke("tokens", "create", *args, "--config", str(config_file))

    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.splitlines()) == 1


def test_cli_errors_are_one_line_with_exit_1(config_file: Path) -> None:
    config = ("--config", str(config_file))
    assert invoke("tokens", "create", "ci", "--scope", "read", *config).exit_code == 0

    duplicate = invoke("tokens", "create", "ci", "--scope", "read", *config)
    unknown = invoke("tokens", "revoke", "ghost", *config)

    assert duplicate.exit_code == 1
    assert duplicate.stderr == "error: an API token named 'ci' already exists\n"
    assert unknown.exit_code == 1
    assert unknown.stderr == "error: no API token named (or with id) 'ghost'\n"
