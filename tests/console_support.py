"""The operator console in tests: an operator, a logged-in httpx client, the token of a page."""

from __future__ import annotations

import re

import httpx

from broker.http.api.context import ApiServices
from provisioning.registry.operators import OperatorInfo, OperatorStore

OPERATOR = "ada"
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def add_operator(services: ApiServices, name: str = OPERATOR, password: str = PASSWORD) -> OperatorInfo:
    """An operator with this password, as ``mqttprov operators add`` makes one."""
    return await OperatorStore(services.registry.engine).add(name, await services.hasher.hash(password))


def csrf_of(page: httpx.Response) -> str:
    """The token the page's forms carry."""
    found = _CSRF.search(page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


async def log_in(
    client: httpx.AsyncClient, name: str = OPERATOR, password: str = PASSWORD, *, next_path: str = "/"
) -> httpx.Response:
    """Fill in and post the login form as a browser would; the answer (not followed)."""
    form = await client.get("/login", params={"next": next_path})
    assert form.status_code == 200, form.text
    data = {"csrf": csrf_of(form), "name": name, "password": password, "next": next_path}
    return await client.post("/login", data=data)


async def logged_in(client: httpx.AsyncClient) -> str:
    """Log the client in; the session's form token (read from the overview)."""
    answer = await log_in(client)
    assert answer.status_code == 303, answer.text
    overview = await client.get("/")
    assert overview.status_code == 200, overview.text
    return csrf_of(overview)
