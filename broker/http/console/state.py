"""What the console's routes work with, one per app: the API's services and the console's own."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

from auth_plugin.throttle import LoginThrottle, ThrottlePolicy
from broker.http.api.context import ApiServices
from provisioning.registry import DeviceStatus
from provisioning.registry.fleet import FleetStats
from provisioning.registry.operators import OperatorStore

HERE = Path(__file__).resolve().parent


@dataclass
class Console:
    """The console's services over the API's: operators and sessions, login throttling, templates."""

    services: ApiServices
    operators: OperatorStore
    fleet: FleetStats
    throttle: LoginThrottle
    templates: Jinja2Templates
    #: Cookies only over HTTPS when the API serves HTTPS.
    secure: bool
    #: A hash to check unknown names against, so that they cost as long as known ones.
    _decoy: str | None = field(default=None, repr=False)

    @classmethod
    def build(cls, services: ApiServices) -> Console:
        """The console over ``services`` (nothing connects yet)."""
        auth = services.settings.auth
        policy = ThrottlePolicy(
            throttle_after=auth.throttle_after,
            lockout_after=auth.lockout_after,
            window=auth.throttle_window,
            lockout_seconds=auth.lockout_seconds,
            max_delay=auth.max_refusal_delay,
        )
        engine = services.registry.engine
        templates = Jinja2Templates(directory=HERE / "templates")
        templates.env.globals["status_names"] = [s.value for s in DeviceStatus]
        return cls(
            services=services,
            operators=OperatorStore(engine),
            fleet=FleetStats(engine),
            throttle=LoginThrottle(policy, max_keys=10_000),
            templates=templates,
            secure=services.settings.api.tls_cert is not None,
        )

    async def decoy_hash(self) -> str:
        """A bcrypt hash of a random secret, made once, at the configured cost."""
        if self._decoy is None:
            self._decoy = await self.services.hasher.hash(secrets.token_urlsafe(16))
        return self._decoy


def console_of(request: Request) -> Console:
    """The console of the app serving ``request``."""
    console: Console = request.app.state.console
    return console
