"""``POST /api/v1/provision``: the MQTT provisioning contract over HTTPS.

The body is the JSON a device publishes to ``provision/request``; the answer is the reply it
would receive on ``provision/reply/<mac>``, decided by the same :meth:`ProvisioningService.handle`
(policies, rate limits, ``error_code``), with a matching HTTP status. One contract, two
transports: only the proof differs in form. Where ``[provisioning] auth`` asks for one, a device
presents it as HTTP Basic credentials, ``provision`` and its fleet secret or device key (the
username and password it would give in its MQTT CONNECT); a back end enrolling on devices'
behalf may present an API token with the ``provision`` scope instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.security import HTTPBasic

from broker.http.api.context import ApiServices, Services
from broker.http.api.limits import limits_of
from broker.http.api.problems import PROBLEM_JSON, ApiError, Problem, Responses
from broker.http.api.security import REALM, bearer, require, token_of
from provisioning.contract import (
    PROVISION_USERNAME,
    ClientIdentity,
    ErrorCode,
    ErrorReply,
    OkReply,
    PendingReply,
    ProvisionRequest,
    Reply,
)
from provisioning.errors import InvalidMacError
from provisioning.keys import derive_device_key, secrets_match
from provisioning.mac import parse_mac
from provisioning.registry.tokens import Scope

logger = logging.getLogger(__name__)

router = APIRouter(tags=["provisioning"])

# Documents the Basic scheme in the OpenAPI document; the header is read by hand below.
_basic = HTTPBasic(auto_error=False, scheme_name="device", description="`provision` and the device's proof.")

#: The HTTP status of each refusal; ``ok`` is 200 and ``pending`` 202.
STATUS_OF_CODE = {
    ErrorCode.INVALID_PAYLOAD: HTTPStatus.BAD_REQUEST,
    ErrorCode.INVALID_MAC: HTTPStatus.BAD_REQUEST,
    ErrorCode.MAC_MISMATCH: HTTPStatus.BAD_REQUEST,
    ErrorCode.PAYLOAD_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ErrorCode.NOT_ALLOWED: HTTPStatus.FORBIDDEN,
    ErrorCode.ALREADY_PROVISIONED: HTTPStatus.CONFLICT,
    ErrorCode.DECOMMISSIONED: HTTPStatus.GONE,
    ErrorCode.RATE_LIMITED: HTTPStatus.TOO_MANY_REQUESTS,
    ErrorCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    ErrorCode.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}


def http_status(reply: Reply) -> int:
    """The HTTP status a contract reply is sent with."""
    if isinstance(reply, OkReply):
        return HTTPStatus.OK
    if isinstance(reply, PendingReply):
        return HTTPStatus.ACCEPTED
    return STATUS_OF_CODE[reply.error_code]


def _refusal(code: ErrorCode) -> dict[str, Any]:
    return {"model": ErrorReply, "description": f"Refused: {code.value}."}


def _either(description: str) -> dict[str, Any]:
    """A status answered with a contract reply or, before the contract is reached, a problem."""
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorReply"}},
            PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}},
        },
    }


_RESPONSES: Responses = {
    HTTPStatus.OK.value: {"model": OkReply, "description": "Credentials, shown this once."},
    HTTPStatus.ACCEPTED.value: {"model": PendingReply, "description": "Waiting for an operator."},
    HTTPStatus.BAD_REQUEST.value: {"model": ErrorReply, "description": "INVALID_PAYLOAD or INVALID_MAC."},
    HTTPStatus.UNAUTHORIZED.value: {"model": Problem, "description": "No valid proof or token."},
    HTTPStatus.FORBIDDEN.value: _either("NOT_ALLOWED, or a token without the provision scope."),
    HTTPStatus.CONFLICT.value: _refusal(ErrorCode.ALREADY_PROVISIONED),
    HTTPStatus.GONE.value: _refusal(ErrorCode.DECOMMISSIONED),
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE.value: _either(
        "PAYLOAD_TOO_LARGE: over [provisioning] max_payload_bytes, or over [api] max_body_bytes."
    ),
    HTTPStatus.UNPROCESSABLE_ENTITY.value: {"model": Problem, "description": "Not used: see 400."},
    HTTPStatus.TOO_MANY_REQUESTS.value: _either(
        "RATE_LIMITED; or TOO_MANY_FAILURES: too many wrong proofs from this address (problem)."
    ),
    HTTPStatus.SERVICE_UNAVAILABLE.value: _refusal(ErrorCode.UNAVAILABLE),
}


def identity_of(payload: bytes, max_bytes: int) -> ClientIdentity:
    """The identity an MQTT session's client id would carry: the MAC the request names.

    A request that names no valid MAC gets an identity with none; the service refuses it
    (``INVALID_PAYLOAD`` or ``INVALID_MAC``) before the identity is compared with anything.
    """
    mac: object = None
    if len(payload) <= max_bytes:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            data = None
        mac = data.get("mac") if isinstance(data, dict) else None
    if isinstance(mac, str):
        try:
            return ClientIdentity(mac, parse_mac(mac), None)
        except InvalidMacError:
            pass
    return ClientIdentity(mac if isinstance(mac, str) else "", "", None)


async def check_proof(request: Request, services: ApiServices, identity: ClientIdentity) -> None:
    """Let the request through if ``[provisioning] auth`` is satisfied; else 401 (or 403)."""
    policy = services.settings.provisioning
    if policy.auth == "none" or not identity.mac:
        return  # no proof asked; or no MAC, which the service refuses without issuing anything
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer":
        credentials = await bearer(request)
        await require(Scope.PROVISION)(await token_of(services, credentials))
        return
    throttle = limits_of(request).proofs
    address = request.client.host if request.client is not None else None
    # A token is 256 random bits, past guessing; a proof is not. Guesses are counted by the
    # address that makes them, whichever MAC they name: the proof is the fleet's, or derived
    # from the fleet's secret.
    if throttle.locked(PROVISION_USERNAME, address):
        logger.info("api: provisioning refused mac=%s address=%s: locked out", identity.mac, address)
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            "TOO_MANY_FAILURES",
            "too many wrong provisioning proofs from this address; try again later",
            headers={"Retry-After": str(limits_of(request).lockout_seconds)},
        )
    presented = _basic_password(value) if scheme.lower() == "basic" else None
    if policy.auth == "fleet_secret" and policy.fleet_secret is not None:
        expected = policy.fleet_secret.get_secret_value()
    elif policy.auth == "device_key" and policy.device_key_secret is not None:
        expected = derive_device_key(policy.device_key_secret.get_secret_value(), identity.mac)
    else:  # pragma: no cover - the settings validator guarantees a secret
        expected = None
    if expected is not None and secrets_match(presented, expected):
        # No throttle.succeeded(): one device's own key must not wipe the count of guesses at
        # another's from the same address.
        return
    logger.info(
        "api: provisioning refused mac=%s address=%s: no valid %s", identity.mac, address, policy.auth
    )
    delay = throttle.failed(PROVISION_USERNAME, address)
    if delay > 0:
        await asyncio.sleep(delay)  # hold the refusal back, as the MQTT listener does a wrong password
    raise ApiError(
        HTTPStatus.UNAUTHORIZED,
        "UNAUTHORIZED",
        f"provisioning needs a proof ({policy.auth}): HTTP Basic {PROVISION_USERNAME!r} and the proof, "
        "or an API token with the provision scope",
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", Bearer realm="{REALM}"'},
    )


def _basic_password(value: str) -> str | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return password if sep and username == PROVISION_USERNAME else None


@router.post(
    "/provision",
    summary="Provision a device (the MQTT contract over HTTP)",
    response_model=None,
    responses=_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ProvisionRequest.model_json_schema()}},
        }
    },
)
async def provision(request: Request, services: Services) -> Response:
    """Take the JSON a device publishes to ``provision/request``; answer with the reply it would get.

    ``ok`` 200, ``pending`` 202, refusals with their ``error_code`` and a matching status
    (``Retry-After`` with ``retry_after``).
    """
    payload = await request.body()
    identity = identity_of(payload, services.settings.provisioning.max_payload_bytes)
    await check_proof(request, services, identity)
    address = request.client.host if request.client is not None else None
    outcome = await services.provisioning.handle(identity, payload, address)
    reply = outcome.reply
    headers = {"Cache-Control": "no-store"}  # an ok reply carries a password
    retry_after = getattr(reply, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if services.announce is not None:
        event = outcome.event()
        if event is not None:
            await services.announce(*event)
    return Response(reply.to_payload(), http_status(reply), headers, media_type="application/json")
