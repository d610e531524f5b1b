"""What the API's routes work with: the services the host process built, one set per app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from config import Settings
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.tokens import TokenStore
from provisioning.service import ProvisioningService

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


@dataclass(frozen=True)
class ApiServices:
    """The services behind the routes, built and owned by the host (``serve`` or ``mqttprov api``).

    The API changes nothing but through them: a decommission here is the CLI's decommission,
    with the same change-feed row, followed by every serving process.
    """

    settings: Settings
    registry: DeviceRegistry
    accounts: AccountRegistry
    hasher: PasswordHasher
    provisioning: ProvisioningService
    tokens: TokenStore
    #: Publishes an enrolment event (topic, JSON) where the host runs a broker; None elsewhere.
    announce: Callable[[str, bytes], Awaitable[None]] | None = None
    #: The process's metrics, answered at ``GET /metrics`` (per ``[api] metrics``).
    metrics: CollectorRegistry | None = None
    #: Whether the host's MQTT listeners accept connections (``serve``), for ``/ready``; None
    #: where the host runs no broker.
    listening: Callable[[], bool] | None = None


def _services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


#: A route's parameter that receives the app's services.
Services = Annotated[ApiServices, Depends(_services)]
