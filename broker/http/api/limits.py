"""What one client may hold of the API: failed provisioning proofs per address, event streams
in all and per token. One :class:`ApiLimits` per app (``app.state.limits``), in memory: each
process counts its own clients, as the MQTT listener's throttle does.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from fastapi import Request

from auth_plugin.throttle import LoginThrottle, ThrottlePolicy
from broker.http.api.problems import ApiError
from config import Settings

#: Seconds a client refused a stream waits before it tries again.
STREAMS_RETRY_AFTER = 10


class StreamSlots:
    """Event streams open now, at most ``total`` in all and ``per_token`` for one token."""

    def __init__(self, total: int, per_token: int) -> None:
        self.total = total
        self.per_token = per_token
        self._open: dict[uuid.UUID, int] = {}
        #: Set when the server stops: every stream ends at once instead of holding the shutdown.
        self.closing = asyncio.Event()

    @property
    def open(self) -> int:
        """Streams open now."""
        return sum(self._open.values())

    def take(self, token_id: uuid.UUID) -> Callable[[], None]:
        """A stream's slot, and what gives it back (once); 429 ``TOO_MANY_STREAMS`` if none is free."""
        mine = self._open.get(token_id, 0)
        if mine >= self.per_token or self.open >= self.total:
            whose = "this token" if mine >= self.per_token else "the server"
            raise ApiError(
                HTTPStatus.TOO_MANY_REQUESTS,
                "TOO_MANY_STREAMS",
                f"{whose} already holds as many event streams as allowed; close one or try later",
                headers={"Retry-After": str(STREAMS_RETRY_AFTER)},
            )
        self._open[token_id] = mine + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open.pop(token_id, 1) - 1
            if left > 0:
                self._open[token_id] = left

        return release


@dataclass
class ApiLimits:
    """The app's per-client bounds (the body size is :class:`~broker.http.api.problems.BodyLimit`'s)."""

    #: Failed provisioning proofs, counted per source address under ``[auth]``'s thresholds.
    proofs: LoginThrottle
    streams: StreamSlots
    #: Seconds a locked-out address is told to wait (``Retry-After``).
    lockout_seconds: int = field(default=60)

    @classmethod
    def build(cls, settings: Settings) -> ApiLimits:
        """The bounds ``[auth]`` and ``[api]`` ask for."""
        auth, api = settings.auth, settings.api
        return cls(
            proofs=LoginThrottle(ThrottlePolicy.of(auth), max_keys=100_000),
            streams=StreamSlots(api.max_streams, api.max_streams_per_token),
            lockout_seconds=max(1, math.ceil(auth.lockout_seconds)),
        )


def limits_of(request: Request) -> ApiLimits:
    """The limits of the app serving ``request``."""
    limits: ApiLimits = request.app.state.limits
    return limits
