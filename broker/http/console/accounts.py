"""``/accounts``: service accounts; add one with its topic rules, rotate, remove.

The same calls as ``mqttprov accounts`` and the API: a generated password hashed in the process's
bcrypt pool, shown once on the answer to the POST (never in a URL, never cached), and a change-feed
row that ends a rotated or removed account's sessions in every serving process.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from broker.http.console.render import done, page, when
from broker.http.console.security import ConsoleDep, Post, Session
from provisioning.errors import ProvisioningError
from provisioning.passwords import generate_password
from provisioning.registry.accounts import AccountNotFoundError, validate_account_name
from provisioning.registry.operators import ConsoleSession
from provisioning.topics import TopicRule, parse_rule

router = APIRouter(prefix="/accounts", include_in_schema=False)

NOTICES = {"removed": "Removed: its sessions are ended within 2 s."}
MAX_RULES = 256


async def _page(
    request: Request,
    console: ConsoleDep,
    session: ConsoleSession,
    *,
    status: int = 200,
    error: str | None = None,
    notice: str | None = None,
    issued: tuple[str, str] | None = None,
    form: dict[str, str] | None = None,
) -> Response:
    accounts = await console.services.accounts.list_accounts()
    return page(
        request,
        "accounts.html",
        session,
        status=status,
        error=error,
        notice=notice,
        accounts=accounts,
        issued=issued,
        form=form or {},
        when=when,
    )


@router.get("")
async def accounts_page(
    request: Request,
    console: ConsoleDep,
    session: Session,
    notice: Annotated[str, Query(alias="done", max_length=32)] = "",
) -> Response:
    """Every account and its rules, and the form to add one."""
    return await _page(request, console, session, notice=NOTICES.get(notice))


@router.post("")
async def add_account(request: Request, console: ConsoleDep, posted: Post) -> Response:
    """Create an account with the rules given, one per line; its password is on this answer only."""
    name, text = posted.get("name"), posted.get("rules")
    try:
        validate_account_name(name)  # before a bcrypt run is spent on a refused name
        rules = _rules(text)
        password = generate_password()
        services = console.services
        account = await services.accounts.add(name, await services.hasher.hash(password), rules)
    except ProvisioningError as exc:
        form = {"name": name, "rules": text}
        return await _page(request, console, posted.session, status=400, error=str(exc), form=form)
    return await _page(request, console, posted.session, issued=(account.name, password), status=201)


def _rules(text: str) -> list[TopicRule]:
    rules = [parse_rule(line) for line in text.splitlines() if line.strip()]
    if not rules or len(rules) > MAX_RULES:
        raise ProvisioningError(f"give 1 to {MAX_RULES} rules, one per line: 'subscribe FILTER'")
    return rules


@router.post("/{name}/rotate")
async def rotate_account(request: Request, console: ConsoleDep, posted: Post, name: str) -> Response:
    """A new password, shown once; sessions still on the old one are disconnected."""
    services = console.services
    try:
        if await services.accounts.find(name) is None:  # before a bcrypt run is spent on it
            raise AccountNotFoundError(f"no service account named {name!r}")
        password = generate_password()
        await services.accounts.rotate(name, await services.hasher.hash(password))
    except ProvisioningError as exc:
        return await _page(request, console, posted.session, status=404, error=str(exc))
    return await _page(request, console, posted.session, issued=(name, password))


@router.post("/{name}/remove")
async def remove_account(request: Request, console: ConsoleDep, posted: Post, name: str) -> Response:
    """Delete the account; its live sessions are disconnected within 2 s."""
    try:
        await console.services.accounts.remove(name)
    except ProvisioningError as exc:
        return await _page(request, console, posted.session, status=404, error=str(exc))
    return done("/accounts", "removed")
