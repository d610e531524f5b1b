"""A client of Mosquitto's dynamic-security plugin (``$CONTROL/dynamic-security/v1``).

Commands go out as ``{"commands": [...]}``, each with a ``correlationData`` of ours; the plugin
answers on ``$CONTROL/dynamic-security/v1/response`` with ``{"responses": [...]}`` echoing it.
Commands that carry a password are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from provisioning.external.link import ExternalBrokerError, MqttLink

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]


class DynsecError(ExternalBrokerError):
    """The plugin answered a command with an error."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"dynamic security {command}: {message}")
        self.command = command
        self.message = message

    @property
    def not_found(self) -> bool:
        """The object named does not exist."""
        return "not found" in self.message.lower()

    @property
    def exists(self) -> bool:
        """The object to create exists already."""
        return "already exists" in self.message.lower()


class Acl(BaseModel):
    """One ACL entry of a role."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    acltype: AclType
    topic: str
    allow: bool
    priority: int = 0


class RoleRef(BaseModel):
    """A role attached to a client or group."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    rolename: str
    priority: int | None = None


class ClientInfo(BaseModel):
    """A dynamic-security client as ``getClient``/``listClients`` describe it (no password)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    username: str
    clientid: str | None = None
    textname: str | None = None
    textdescription: str | None = None
    disabled: bool = False
    roles: list[RoleRef] = Field(default_factory=list)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    command: str
    error: str | None = None
    data: dict[str, Any] | None = None
    correlation: str | None = Field(default=None, alias="correlationData")


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    responses: list[_Response]


class DynsecClient:
    """Send dynamic-security commands over an admin :class:`MqttLink` and await their responses."""

    def __init__(self, link: MqttLink, *, timeout: float = 5.0) -> None:
        self._link = link
        self._timeout = timeout
        self._waiting: dict[str, asyncio.Future[_Response]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the response topic and start reading it."""
        await self._link.subscribe(RESPONSE_TOPIC, qos=1)
        self._reader = asyncio.create_task(self._read(), name="mqttprov-dynsec-responses")

    async def stop(self) -> None:
        """Stop reading responses; commands still waiting fail."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def _read(self) -> None:
        while True:
            message = await self._link.messages.get()
            if message.topic != RESPONSE_TOPIC:
                continue
            try:
                envelope = _Envelope.model_validate_json(message.payload)
            except ValidationError:
                logger.warning("ignored an unreadable dynamic-security response")
                continue
            for response in envelope.responses:
                future = self._waiting.pop(response.correlation or "", None)
                if future is not None and not future.done():
                    future.set_result(response)

    async def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Run one command; its ``data`` (empty when none), or :class:`DynsecError`."""
        correlation = uuid.uuid4().hex
        future: asyncio.Future[_Response] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        body = {"commands": [{"command": command, **arguments, "correlationData": correlation}]}
        try:
            await self._link.publish(CONTROL_TOPIC, json.dumps(body).encode(), qos=1)
            response = await asyncio.wait_for(future, self._timeout)
        except TimeoutError as exc:
            raise ExternalBrokerError(
                f"dynamic security {command}: no response within {self._timeout:g}s "
                "(is the plugin loaded, and may this client use $CONTROL/dynamic-security/#?)"
            ) from exc
        finally:
            self._waiting.pop(correlation, None)
        if response.error:
            raise DynsecError(command, response.error)
        logger.debug("dynamic security %s done", command)
        return response.data or {}

    async def _lookup(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        """As :meth:`call`, with None when the object named does not exist."""
        try:
            return await self.call(command, **arguments)
        except DynsecError as exc:
            if exc.not_found:
                return None
            raise

    # -- clients ----------------------------------------------------------------------------------

    async def create_client(
        self,
        username: str,
        password: str,
        *,
        clientid: str | None,
        roles: list[str],
        textname: str,
        textdescription: str,
    ) -> None:
        """Create a client with this password (Mosquitto hashes it) and these roles."""
        arguments: dict[str, Any] = {
            "username": username,
            "password": password,
            "textname": textname,
            "textdescription": textdescription,
            "roles": [{"rolename": role, "priority": -1} for role in roles],
        }
        if clientid is not None:
            arguments["clientid"] = clientid
        await self.call("createClient", **arguments)

    async def set_client_password(self, username: str, password: str) -> None:
        """Replace a client's password (Mosquitto disconnects its sessions)."""
        await self.call("setClientPassword", username=username, password=password)

    async def modify_client(self, username: str, **fields: Any) -> None:
        """Change a client's text fields, client id or roles."""
        await self.call("modifyClient", username=username, **fields)

    async def enable_client(self, username: str) -> None:
        """Let a disabled client log in again."""
        await self.call("enableClient", username=username)

    async def disable_client(self, username: str) -> None:
        """Refuse the client's logins from now on and disconnect its sessions."""
        await self.call("disableClient", username=username)

    async def delete_client(self, username: str) -> None:
        """Remove the client (its sessions are disconnected)."""
        await self.call("deleteClient", username=username)

    async def get_client(self, username: str) -> ClientInfo | None:
        """The client, or None when there is none by that name."""
        data = await self._lookup("getClient", username=username)
        return None if data is None else ClientInfo.model_validate(data.get("client", {}))

    async def list_clients(self) -> list[ClientInfo]:
        """Every client, with details."""
        data = await self.call("listClients", verbose=True, count=-1, offset=0)
        return [ClientInfo.model_validate(item) for item in data.get("clients", [])]

    # -- roles and defaults -----------------------------------------------------------------------

    async def create_role(self, rolename: str, acls: list[Acl], *, textname: str = "") -> None:
        """Create a role with these ACLs."""
        await self.call(
            "createRole",
            rolename=rolename,
            textname=textname,
            acls=[acl.model_dump() for acl in acls],
        )

    async def delete_role(self, rolename: str) -> None:
        """Remove a role."""
        await self.call("deleteRole", rolename=rolename)

    async def get_role_acls(self, rolename: str) -> list[Acl] | None:
        """The role's ACLs, or None when there is no such role."""
        data = await self._lookup("getRole", rolename=rolename)
        if data is None:
            return None
        return [Acl.model_validate(item) for item in data.get("role", {}).get("acls", [])]

    async def set_default_acl_access(self, access: dict[str, bool]) -> None:
        """What is allowed when no role says: ``{"publishClientSend": False, ...}``."""
        await self.call(
            "setDefaultACLAccess", acls=[{"acltype": kind, "allow": allow} for kind, allow in access.items()]
        )
