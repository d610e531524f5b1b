"""``GET /api/v1/devices/{device}/events`` (a device's audit trail, by page) and
``GET /api/v1/events/stream``: the fleet's enrolments and presence changes as Server-Sent Events.

The stream follows the registry (:class:`EventFeed`), not this process's broker: it works the
same in ``mqttprov serve`` and in a ``mqttprov api`` beside other brokers, and shows what every
process did. It reads every :data:`POLL` s; presence is read :data:`SETTLE` s behind the clock,
because a broker writes presence in batches stamped with the time of the change, a moment
before they commit. Each event's ``id`` is the stream's position: a client that reconnects with
``Last-Event-ID`` (browsers' ``EventSource`` does) gets what it missed, not what it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from broker.http.api.context import ApiServices, Services
from broker.http.api.devices import DevicePath, find
from broker.http.api.limits import StreamSlots, limits_of
from broker.http.api.problems import Responses, problems
from broker.http.api.security import Credentials, Reader
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import DeviceEventInfo
from provisioning.registry.event_feed import EventFeed, PresenceChange
from provisioning.registry.models import DeviceStatus, utcnow
from provisioning.registry.tokens import Scope as TokenScope

logger = logging.getLogger(__name__)

router = APIRouter(tags=["events"])

EVENT_STREAM = "text/event-stream"
#: Seconds between two reads of the registry while nothing new came.
POLL = 1.0
#: How far behind the clock presence is read (a broker's batch commits after its time stamps).
SETTLE = timedelta(seconds=2)
#: Seconds of silence after which a comment line is sent, so proxies keep the connection.
KEEPALIVE = 15.0
#: Seconds between two checks that the stream's token is still valid (revoked: the stream ends).
TOKEN_RECHECK = 5.0
#: Events read per query; a fuller read is followed at once by the next.
BATCH = 500
#: What a client waits before reconnecting, in ms (the SSE ``retry`` field).
RETRY_MS = 3000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NIL = uuid.UUID(int=0)


class DeviceEvents(BaseModel):
    """A page of a device's audit events, newest first."""

    events: list[DeviceEventInfo]
    next_before: int | None = Field(description="Pass as `before` for the older page; null on the last.")


@router.get(
    "/devices/{device}/events", summary="A device's events", responses=problems(NOT_FOUND="No such device.")
)
async def device_events(
    services: Services,
    _token: Reader,
    device: DevicePath,
    limit: Annotated[int, Query(ge=1, le=500, description="Events per page.")] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=2**62, description="A page's `next_before`: the events older than it.")
    ] = None,
) -> DeviceEvents:
    """The device's audit events (enrolment, decisions, logins, refusals...), newest first."""
    found = await find(services.registry, device)
    events = await EventFeed(services.registry.engine).device_events(found.id, limit=limit, before=before)
    return DeviceEvents(events=events, next_before=events[-1].id if len(events) == limit else None)


@dataclass(frozen=True)
class Position:
    """Where a stream is: the last enrolment event's id, and the last presence read."""

    event_id: int
    seen_at: datetime
    seen_id: uuid.UUID

    def __str__(self) -> str:
        micros = (self.seen_at - _EPOCH) // timedelta(microseconds=1)
        return f"{self.event_id}.{micros}.{self.seen_id.hex}"

    @classmethod
    def parse(cls, text: str | None) -> Position | None:
        """The position an event's ``id`` names; None for anything else (the stream starts now)."""
        try:
            event_id, micros, seen = (text or "").split(".")
            return cls(int(event_id), _EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=seen))
        except (ValueError, OverflowError):
            return None


def _frame(kind: str, position: Position, data: dict[str, Any]) -> str:
    return f"id: {position}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _enrolment(event: DeviceEventInfo) -> dict[str, Any]:
    return {
        "device_id": None if event.device_id is None else str(event.device_id),
        "mac": event.mac,
        "kind": event.kind,
        "actor": event.actor,
        "at": event.created_at.isoformat(),
    }


def _presence(change: PresenceChange) -> dict[str, Any]:
    return {
        "device_id": str(change.device_id),
        "mac": change.mac,
        "online": change.status is DeviceStatus.ONLINE,
        "status": change.status.value,
        "at": change.at.isoformat(),
    }


class EventStream(StreamingResponse):
    """A stream that gives its slot back however it ends (done, client gone, cancelled)."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # nginx: do not buffer
        super().__init__(body, media_type=EVENT_STREAM, headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


_STREAM_RESPONSES: Responses = {
    200: {
        "description": "Server-Sent Events: `enrolment` and `presence`, keep-alive comments.",
        "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
    },
    **problems(TOO_MANY_REQUESTS="TOO_MANY_STREAMS: as many streams as [api] allows are open."),
}


@router.get(
    "/events/stream",
    summary="Stream enrolments and presence changes",
    response_class=StreamingResponse,
    responses=_STREAM_RESPONSES,
)
async def stream(
    request: Request,
    services: Services,
    token: Reader,
    credentials: Credentials,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=128,
            description="The last event's `id`: resume after it (anything else: start now).",
        ),
    ] = None,
) -> StreamingResponse:
    """Every enrolment (``provisioned``, ``reissued``, ``requested``) and presence change of the
    fleet, as they are written, from any process; ends after ``[api] stream_seconds``."""
    feed = EventFeed(services.registry.engine)
    slots = limits_of(request).streams
    position = Position.parse(last_event_id)
    if position is None:
        position = Position(await feed.last_event_id(), utcnow(), _NIL)
    release = slots.take(token.id)
    secret = credentials.credentials if credentials is not None else ""
    body = _follow(services, feed, slots, position, secret)
    return EventStream(body, release)


async def _follow(
    services: ApiServices, feed: EventFeed, slots: StreamSlots, position: Position, secret: str
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    ends = loop.time() + services.settings.api.stream_seconds
    quiet_since = checked = loop.time()
    yield f"retry: {RETRY_MS}\n\n"
    while not slots.closing.is_set() and loop.time() < ends:
        try:
            enrolments = await feed.enrolments_after(position.event_id, limit=BATCH)
            for event in enrolments:
                position = replace(position, event_id=event.id)
                yield _frame("enrolment", position, _enrolment(event))
            after = (position.seen_at, position.seen_id)
            changes = await feed.presence_after(after, utcnow() - SETTLE, limit=BATCH)
            for change in changes:
                position = replace(position, seen_at=change.at, seen_id=change.device_id)
                yield _frame("presence", position, _presence(change))
            if loop.time() - checked >= TOKEN_RECHECK:
                checked = loop.time()
                current = await services.tokens.authenticate(secret)
                if current is None or not current.allows(TokenScope.READ):
                    logger.info("api: event stream ended: its token is no longer valid")
                    return
        except RegistryUnavailableError as exc:
            # The client reconnects with its Last-Event-ID and misses nothing.
            logger.info("api: event stream ended: %s", exc)
            return
        if enrolments or changes:
            quiet_since = loop.time()
            if len(enrolments) == BATCH or len(changes) == BATCH:
                continue
        elif loop.time() - quiet_since >= KEEPALIVE:
            quiet_since = loop.time()
            yield ": keep-alive\n\n"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slots.closing.wait(), max(0.0, min(POLL, ends - loop.time())))
