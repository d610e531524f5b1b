"""Who may call a route: ``Authorization: Bearer <API token>`` holding the route's scope.

Tokens are checked against the registry on every request (:class:`TokenStore`): one revoked by
``mqttprov tokens revoke`` is refused by the next request, in every process. Scopes are explicit:
``write`` does not imply ``read``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.http.api.context import Services
from broker.http.api.problems import ApiError
from provisioning.registry.tokens import ApiTokenInfo, Scope

logger = logging.getLogger(__name__)

REALM = "mqttprov"

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token (`mqttprov tokens create NAME --scope ...`), holding the route's scope.",
)

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def token_of(services: Services, credentials: Credentials) -> ApiTokenInfo | None:
    """The token a request presents; None without one, 401 for one that is not valid."""
    if credentials is None:
        return None
    token = await services.tokens.authenticate(credentials.credentials)
    if token is None:
        raise ApiError(
            HTTPStatus.UNAUTHORIZED,
            "UNAUTHORIZED",
            "the API token is not valid (unknown, revoked or malformed)",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
        )
    return token


PresentedToken = Annotated[ApiTokenInfo | None, Depends(token_of)]


def require(scope: Scope) -> Callable[..., Awaitable[ApiTokenInfo]]:
    """A dependency: the request's token if it holds ``scope``; 401 without a valid one, else 403."""

    async def holding(token: PresentedToken) -> ApiTokenInfo:
        if token is None:
            raise ApiError(
                HTTPStatus.UNAUTHORIZED,
                "UNAUTHORIZED",
                "this route needs an API token: Authorization: Bearer <token>",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        if not token.allows(scope):
            logger.info("api: token %s refused: no %s scope", token.name, scope.value)
            raise ApiError(
                HTTPStatus.FORBIDDEN,
                "FORBIDDEN",
                f"this API token lacks the {scope.value!r} scope",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'},
            )
        return token

    holding.__name__ = f"require_{scope.value}"
    return holding


Reader = Annotated[ApiTokenInfo, Depends(require(Scope.READ))]
Writer = Annotated[ApiTokenInfo, Depends(require(Scope.WRITE))]
