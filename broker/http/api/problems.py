"""Every error the API answers, in one shape: RFC 7807 ``application/problem+json``.

``{"type", "title", "status", "detail", "error_code"}``: ``error_code`` is the stable part a
client branches on (the registry's own codes, ``NOT_FOUND``, ``ALREADY_EXISTS``, ...), ``detail``
one line for a person. A bad request is a 4xx saying what is wrong; a traceback is logged for
bugs only and never sent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from provisioning.errors import (
    ConcurrentChangeError,
    DeviceExistsError,
    InvalidTransitionError,
    ProvisioningError,
    RegistryUnavailableError,
)
from provisioning.registry.accounts import AccountExistsError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: Where each problem type is described (docs/api.md lists every ``error_code``).
TYPE_PREFIX = "urn:mqttprov:problem:"
#: Seconds a client waits before trying again after a 503 (the registry is away).
RETRY_AFTER = 5

_STATUS_CODES = {
    HTTPStatus.BAD_REQUEST: "BAD_REQUEST",
    HTTPStatus.UNAUTHORIZED: "UNAUTHORIZED",
    HTTPStatus.FORBIDDEN: "FORBIDDEN",
    HTTPStatus.NOT_FOUND: "NOT_FOUND",
    HTTPStatus.METHOD_NOT_ALLOWED: "METHOD_NOT_ALLOWED",
    HTTPStatus.NOT_ACCEPTABLE: "NOT_ACCEPTABLE",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "PAYLOAD_TOO_LARGE",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "UNSUPPORTED_MEDIA_TYPE",
    HTTPStatus.UNPROCESSABLE_ENTITY: "INVALID_REQUEST",
}


class Problem(BaseModel):
    """An RFC 7807 problem document, with the project's stable ``error_code``."""

    type: str = Field(description="A URN naming the problem: urn:mqttprov:problem:<error_code>.")
    title: str = Field(description="The HTTP status phrase.")
    status: int = Field(description="The HTTP status code, repeated.")
    detail: str = Field(description="One line for a person: what is wrong.")
    error_code: str = Field(description="The stable code a client branches on.")


class ApiError(Exception):
    """An answer other than success, raised by a route or a dependency."""

    def __init__(
        self, status: int, error_code: str, detail: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.headers = headers


def problem_response(
    status: int, error_code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The problem+json response for ``status``."""
    body = Problem(
        type=TYPE_PREFIX + error_code,
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        error_code=error_code,
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers, media_type=PROBLEM_JSON)


Responses = dict[int | str, dict[str, Any]]


def problems(**described: str) -> Responses:
    """OpenAPI ``responses`` documenting problem answers: ``problems(NOT_FOUND="No such device.")``."""
    return {HTTPStatus[name].value: {"model": Problem, "description": why} for name, why in described.items()}


def status_of(exc: ProvisioningError) -> int:
    """The HTTP status of a domain error: what the error *is*, not where it was raised."""
    if isinstance(exc, LookupError):  # devices, accounts, tokens not found
        return HTTPStatus.NOT_FOUND
    conflicts = DeviceExistsError | AccountExistsError | InvalidTransitionError | ConcurrentChangeError
    if isinstance(exc, conflicts):
        return HTTPStatus.CONFLICT
    if isinstance(exc, RegistryUnavailableError):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if exc.error_code == "ALREADY_EXISTS":  # a token name taken
        return HTTPStatus.CONFLICT
    # Invalid names, MACs, limits: the request asked for something the registry refuses.
    return HTTPStatus.UNPROCESSABLE_ENTITY


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProvisioningError)
    status = status_of(exc)
    headers = None
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        logger.warning("api: the registry is unavailable: %s", exc)
        headers = {"Retry-After": str(RETRY_AFTER)}
        return problem_response(status, "UNAVAILABLE", "the registry is unavailable; try again", headers)
    code = exc.error_code if exc.error_code != "INTERNAL" else _STATUS_CODES.get(HTTPStatus(status), "ERROR")
    return problem_response(status, code, str(exc), headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem_response(exc.status, exc.error_code, exc.detail, exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(HTTPStatus.UNPROCESSABLE_ENTITY, "INVALID_REQUEST", validation_detail(exc))


def validation_detail(exc: RequestValidationError) -> str:
    """The first thing wrong with a request, as ``where: what`` (``body.mac: Field required``)."""
    errors: list[dict[str, Any]] = list(exc.errors())
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = HTTPStatus(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != status.phrase else ""
    code = _STATUS_CODES.get(status, "ERROR")
    return problem_response(status, code, detail or status.phrase.lower(), dict(exc.headers or {}) or None)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    # A bug: its traceback is for the log, the client gets one line.
    logger.error("api: %s %s failed", request.method, request.url.path, exc_info=exc)
    return problem_response(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", "internal error; try again later")


def install_handlers(app: FastAPI) -> None:
    """Answer every error the app can raise as a problem document."""
    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        ApiError: _api_error,
        ProvisioningError: _domain_error,
        RequestValidationError: _validation_error,
        StarletteHTTPException: _http_error,
        Exception: _bug,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413, reading no more of it.

    A declared ``Content-Length`` over the limit is refused before any byte is read; a chunked
    body is counted as it arrives. The body is read before the app runs (it would read all of it
    anyway), so the app never sees a body cut short.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # a streaming response waits here for the disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            f"the request body is larger than {self.max_bytes} bytes",
            # The rest of the body is not read: the connection cannot be reused.
            {"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
