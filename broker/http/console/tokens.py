"""``/tokens``: API tokens; create one with its scopes (the secret shown once), list, revoke.

The registry's :class:`~provisioning.registry.tokens.TokenStore`, as ``mqttprov tokens`` uses it:
only the secret's SHA-256 is stored, and a revoked token is refused by the next request.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from broker.http.console.render import done, page, when
from broker.http.console.security import ConsoleDep, Post, Session
from provisioning.errors import ProvisioningError
from provisioning.registry.operators import ConsoleSession
from provisioning.registry.tokens import Scope, TokenError

router = APIRouter(prefix="/tokens", include_in_schema=False)

NOTICES = {"revoked": "Revoked: the next request with it is refused."}


async def _page(
    request: Request,
    console: ConsoleDep,
    session: ConsoleSession,
    *,
    status: int = 200,
    error: str | None = None,
    notice: str | None = None,
    issued: tuple[str, str] | None = None,
) -> Response:
    tokens = await console.services.tokens.list()
    return page(
        request,
        "tokens.html",
        session,
        status=status,
        error=error,
        notice=notice,
        tokens=tokens,
        issued=issued,
        scopes=[s.value for s in Scope],
        when=when,
    )


@router.get("")
async def tokens_page(
    request: Request,
    console: ConsoleDep,
    session: Session,
    notice: Annotated[str, Query(alias="done", max_length=32)] = "",
) -> Response:
    """Every token (never a secret) and the form to create one."""
    return await _page(request, console, session, notice=NOTICES.get(notice))


@router.post("")
async def create_token(request: Request, console: ConsoleDep, posted: Post) -> Response:
    """A token with the scopes ticked; its secret is on this answer only."""
    try:
        scopes = frozenset(Scope(value) for value in posted.all("scope"))
        issued = await console.services.tokens.create(posted.get("name"), scopes)
    except ValueError as exc:
        return await _page(request, console, posted.session, status=400, error=f"unknown scope: {exc}")
    except TokenError as exc:
        status = 409 if exc.error_code == "ALREADY_EXISTS" else 400
        return await _page(request, console, posted.session, status=status, error=str(exc))
    return await _page(
        request, console, posted.session, status=201, issued=(issued.token.name, issued.secret)
    )


@router.post("/{token_id}/revoke")
async def revoke_token(request: Request, console: ConsoleDep, posted: Post, token_id: uuid.UUID) -> Response:
    """Delete the token: every process refuses it from its next request on."""
    try:
        await console.services.tokens.revoke(token_id)
    except ProvisioningError as exc:
        return await _page(request, console, posted.session, status=404, error=str(exc))
    return done("/tokens", "revoked")
