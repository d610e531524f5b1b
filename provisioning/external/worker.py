"""Serve ``provision/request`` on an external broker with the same :class:`ProvisioningService`.

On an external broker the worker is an ordinary subscriber: it cannot see the client id of
the session that published a request. Identity therefore rests on the broker's ACL. The reply
goes to ``provision/reply/<mac exactly as written in the request>``, and the broker must let
only the session whose client id is literally that MAC receive that topic (Mosquitto: an
``acl_file`` ``pattern read provision/reply/%c``; see docs/mosquitto.md). A request naming
another MAC is answered on that MAC's reply topic, which only that MAC's session can read, so
``MAC_MISMATCH`` cannot happen here, and a request without a usable MAC gets no reply at all:
there is no topic that only its sender could read.
"""

from __future__ import annotations

import asyncio
import json
import logging

from provisioning.contract import REQUEST_TOPIC, ClientIdentity
from provisioning.errors import InvalidMacError
from provisioning.external.link import ExternalBrokerError, Message, MqttLink
from provisioning.mac import parse_mac
from provisioning.service import ProvisioningService

logger = logging.getLogger(__name__)


def request_filter(shared_group: str) -> str:
    """``$share/<group>/provision/request`` so several workers split the requests; plain if empty."""
    return f"$share/{shared_group}/{REQUEST_TOPIC}" if shared_group else REQUEST_TOPIC


def identity_of_request(payload: bytes, *, max_bytes: int) -> ClientIdentity | None:
    """The identity a request claims (its ``mac`` as written), or None when it names no MAC.

    Everything else about the payload is left to :class:`ProvisioningService`, which answers
    its refusals on this MAC's reply topic.
    """
    if len(payload) > max_bytes:
        return None
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    mac = data.get("mac") if isinstance(data, dict) else None
    if not isinstance(mac, str):
        return None
    try:
        return ClientIdentity(mac, parse_mac(mac), None)
    except InvalidMacError:
        return None


class ProvisioningWorker:
    """Answer every request the link receives; one task per request, tracked and cancelled on stop."""

    def __init__(
        self,
        link: MqttLink,
        service: ProvisioningService,
        *,
        shared_group: str,
        max_bytes: int,
        ready: asyncio.Event | None = None,
    ) -> None:
        self._link = link
        self._ready = ready
        self._service = service
        self._filter = request_filter(shared_group)
        self._max_bytes = max_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self.served = 0

    async def run(self) -> None:
        """Subscribe and serve until cancelled; the service's credential pool is filled meanwhile."""
        await self._link.subscribe(self._filter, qos=1)
        logger.info("provisioning worker serving %s on %s", self._filter, self._link.address)
        pool = self._service.pool
        filling = asyncio.create_task(pool.run(), name="mqttprov-credential-pool")
        if self._ready is not None:
            self._ready.set()
        try:
            while True:
                message = await self._link.messages.get()
                if message.topic != REQUEST_TOPIC:
                    continue
                task = asyncio.create_task(self._serve(message), name="mqttprov-worker-request")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            # Let requests in progress finish (a reply after a commit is worth the wait); only
            # what is still running after that is cancelled.
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self._link.timeout)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # After the last request: the unused credentials are dropped with the fill loop.
            pool.request_stop()
            await _ended(filling)

    async def _serve(self, message: Message) -> None:
        identity = identity_of_request(message.payload, max_bytes=self._max_bytes)
        if identity is None:
            logger.info("dropped a provisioning request that names no MAC (%d bytes)", len(message.payload))
            return
        outcome = await self._service.handle(identity, message.payload, None)
        try:
            await self._link.publish(outcome.topic, outcome.reply.to_payload(), qos=1)
            self.served += 1
            event = outcome.event()
            if event is not None:
                await self._link.publish(*event, qos=1)
        except ExternalBrokerError as exc:
            # The device hears nothing and asks again: its next request is a reissue.
            logger.warning("provisioning reply for %s not delivered: %s", identity.mac, exc)


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait for a background task asked to stop; its failure is logged, not raised over the stop."""
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()  # cancelled twice: do not leave it behind
        raise
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s ended with an error", task.get_name(), exc_info=task.exception())
