"""``/api/v1/accounts``: service accounts for back ends; passwords are returned once.

The same calls as ``mqttprov accounts``: a generated password, its bcrypt hash (off the event
loop, in the process's bcrypt pool) stored by :class:`AccountRegistry`, whose change-feed rows
end the sessions of a rotated or removed account in every serving process.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from broker.http.api.context import Services
from broker.http.api.problems import problems
from broker.http.api.security import Reader, Writer
from provisioning.passwords import generate_password
from provisioning.registry.accounts import (
    AccountInfo,
    AccountNotFoundError,
    validate_account_name,
)
from provisioning.topics import TopicRule

router = APIRouter(prefix="/accounts", tags=["accounts"])

NamePath = Annotated[str, Path(max_length=64, description="The account's name (its MQTT username).")]
_NOT_FOUND = problems(NOT_FOUND="No such account.")


def _known(name: str) -> str:
    """``name``, or not found for one with control characters (PostgreSQL cannot compare NUL)."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise AccountNotFoundError(f"no service account named {name!r}")
    return name


class AccountList(BaseModel):
    """Every service account, by name (never a password)."""

    accounts: list[AccountInfo]


class NewAccount(BaseModel):
    """An account and exactly the topics it may use."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, examples=["telemetry"])
    allow: list[TopicRule] = Field(
        max_length=256, examples=[[{"action": "subscribe", "filter": "devices/+/telemetry"}]]
    )


class IssuedAccount(BaseModel):
    """An account with its new password: shown this once, only its bcrypt hash is stored."""

    account: AccountInfo
    password: str


@router.get("", summary="List service accounts")
async def list_accounts(services: Services, _token: Reader) -> AccountList:
    """Every service account and its topic rules."""
    return AccountList(accounts=await services.accounts.list_accounts())


@router.post(
    "",
    status_code=HTTPStatus.CREATED,
    summary="Create a service account",
    responses=problems(CONFLICT="The name is taken.", UNPROCESSABLE_ENTITY="An invalid name or rule."),
)
async def add_account(services: Services, _token: Writer, body: NewAccount) -> IssuedAccount:
    """Create an account with exactly these rules; its generated password is in this reply only."""
    validate_account_name(body.name)  # before a bcrypt run is spent on a refused name
    password = generate_password()
    account = await services.accounts.add(body.name, await services.hasher.hash(password), body.allow)
    return IssuedAccount(account=account, password=password)


@router.post("/{name}/rotate", summary="Rotate an account's password", responses=_NOT_FOUND)
async def rotate_account(services: Services, _token: Writer, name: NamePath) -> IssuedAccount:
    """Issue a new password; sessions still using the old one are disconnected."""
    if await services.accounts.find(_known(name)) is None:  # before a bcrypt run is spent on it
        raise AccountNotFoundError(f"no service account named {name!r}")
    password = generate_password()
    account = await services.accounts.rotate(name, await services.hasher.hash(password))
    return IssuedAccount(account=account, password=password)


@router.delete(
    "/{name}", status_code=HTTPStatus.NO_CONTENT, summary="Remove an account", responses=_NOT_FOUND
)
async def remove_account(services: Services, _token: Writer, name: NamePath) -> None:
    """Delete the account; its live sessions are disconnected within 2 s."""
    await services.accounts.remove(_known(name))
