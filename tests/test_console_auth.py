"""The console's logins, sessions and defences over HTTP: cookies, CSRF, expiry, throttling, headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from importlib.resources import files
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from broker.cli import app as cli
from provisioning.registry.models import OperatorSession, utcnow
from provisioning.registry.operators import IDLE, OperatorStore
from tests.api_support import Api, api_settings, running_api
from tests.authd_support import migrate
from tests.console_support import OPERATOR, PASSWORD, add_operator, csrf_of, log_in, logged_in
from tests.helpers import preserved_logging, write_config


@pytest.fixture
async def api(sqlite_url: str) -> AsyncIterator[Api]:
    async with running_api(api_settings(sqlite_url)) as running:
        await add_operator(running.server.services)
        yield running


async def test_a_page_without_a_session_goes_to_the_login_page_and_back(api: Api) -> None:
    answer = await api.client.get("/?tab=1")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2F%3Ftab%3D1"
    fragment = await api.client.get("/?fragment=1")
    assert fragment.status_code == 401

    logged = await log_in(api.client, next_path="/?tab=1")
    assert logged.status_code == 303
    assert logged.headers["location"] == "/?tab=1"
    cookie = logged.headers["set-cookie"]
    assert cookie.startswith("mqttprov_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure over HTTPS
    overview = await api.client.get("/")
    assert overview.status_code == 200
    assert OPERATOR in overview.text
    assert overview.headers["cache-control"] == "no-store"


async def test_a_wrong_password_or_an_unknown_name_is_the_same_refusal(api: Api) -> None:
    wrong = await log_in(api.client, password="not the password")
    unknown = await log_in(api.client, name="nobody")
    for answer in (wrong, unknown):
        assert answer.status_code == 401
        assert "Wrong name or password." in answer.text
        assert "mqttprov_session" not in answer.headers.get("set-cookie", "")


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example"])
async def test_after_login_only_paths_of_this_site(api: Api, target: str) -> None:
    logged = await log_in(api.client, next_path=target)
    assert logged.headers["location"] == "/"


async def test_a_form_posted_without_its_token_is_refused(api: Api) -> None:
    token = await logged_in(api.client)
    for data in ({}, {"csrf": "forged"}, {"csrf": token[:-1]}):
        refused = await api.client.post("/logout", data=data)
        assert refused.status_code == 403, data
    assert (await api.client.get("/")).status_code == 200  # still logged in: nothing was done

    login_form = await api.client.get("/login")
    data = {"csrf": "not-the-cookie", "name": OPERATOR, "password": PASSWORD, "next": "/"}
    assert (await api.client.post("/login", data=data)).status_code == 403
    assert csrf_of(login_form)


async def test_logout_ends_the_session_everywhere(api: Api) -> None:
    token = await logged_in(api.client)
    cookie = api.client.cookies["mqttprov_session"]
    out = await api.client.post("/logout", data={"csrf": token})
    assert out.status_code == 303
    assert out.headers["location"] == "/login"
    # The old cookie, replayed (another tab, a copy): the session is gone from the registry.
    api.client.cookies.set("mqttprov_session", cookie)
    assert (await api.client.get("/")).status_code == 303


async def test_an_idle_session_expires_and_a_removed_operator_is_logged_out(api: Api) -> None:
    await logged_in(api.client)
    engine = api.server.services.registry.engine
    store = OperatorStore(engine)
    async with engine.begin() as conn:
        await conn.execute(
            update(OperatorSession).values(last_seen_at=utcnow() - IDLE - timedelta(seconds=1))
        )
    expired = await api.client.get("/")
    assert expired.status_code == 303
    assert expired.headers["location"].startswith("/login")

    await logged_in(api.client)
    await store.remove(OPERATOR)
    assert (await api.client.get("/")).status_code == 303


async def test_failed_logins_are_throttled_as_mqtt_logins(sqlite_url: str) -> None:
    settings = api_settings(
        sqlite_url, auth={"throttle_after": 2, "lockout_after": 3, "max_refusal_delay": 0.1}
    )
    async with running_api(settings) as api:
        await add_operator(api.server.services)
        codes = [(await log_in(api.client, password="guess number one")).status_code for _ in range(4)]
        locked = await log_in(api.client)  # the right password, from a locked-out pair
    assert codes == [401, 401, 401, 429]
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.text


async def test_every_console_answer_carries_the_security_headers(api: Api) -> None:
    await logged_in(api.client)
    for path in ("/", "/login", "/static/console.js", "/api/v1/devices"):
        answer = await api.client.get(path)
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "'unsafe-inline'" not in csp
        assert "frame-ancestors 'none'" in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"
    page = await api.client.get("/")
    assert "<script>" not in page.text
    assert " style=" not in page.text
    assert "content-security-policy" not in (await api.client.get("/docs")).headers  # Swagger UI's own


async def test_the_console_can_be_turned_off(sqlite_url: str) -> None:
    async with running_api(api_settings(sqlite_url, api={"console": False})) as api:
        assert (await api.client.get("/login")).status_code == 404
        assert (await api.client.get("/health")).status_code == 200


# -- mqttprov operators ------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str) -> Path:
    return write_config(
        tmp_path / "mqttprov.toml", {"database": {"url": sqlite_url}, "auth": {"bcrypt_cost": 4}}
    )


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with preserved_logging():
        yield


def operators(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["operators", *args], input=stdin, catch_exceptions=False)
    return result.exit_code, result.output


def test_operators_add_list_remove(config_file: Path, sqlite_url: str) -> None:
    config = ("--config", str(config_file))
    code, out = operators("add", "grace", "--password-stdin", *config, stdin="short\n")
    assert (code, out.strip()) == (2, "error: an operator's password needs at least 12 characters")
    code, out = operators("add", "1grace", "--password-stdin", *config, stdin=PASSWORD + "\n")
    assert code == 2
    assert "invalid operator name" in out

    asyncio.run(migrate(sqlite_url))
    code, out = operators("add", "grace", "--password-stdin", *config, stdin=PASSWORD + "\n")
    assert (code, out.strip()) == (0, "added operator 'grace': log in to the console with this name")
    code, out = operators("add", "grace", "--password-stdin", *config, stdin=PASSWORD + "\n")
    assert (code, out.strip()) == (1, "error: an operator named 'grace' already exists")
    code, out = operators("list", "--json", *config)
    assert code == 0
    listed = json.loads(out)["operators"]
    assert [o["name"] for o in listed] == ["grace"]
    assert set(listed[0]) == {"id", "name", "created_at", "last_login_at"}
    code, out = operators("remove", "grace", *config)
    assert (code, out.strip()) == (0, "removed operator 'grace'; their console sessions are ended")
    code, out = operators("remove", "grace", *config)
    assert (code, out.strip()) == (1, "error: no operator named 'grace'")


def test_templates_and_static_files_are_package_data() -> None:
    console = files("broker.http") / "console"
    for name in ("templates/base.html", "templates/login.html", "static/console.js", "static/console.css"):
        assert (console / name).is_file(), name
