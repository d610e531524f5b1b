"""The registry writes logins leave behind, done in the background: refusal audits, verifiers."""

from __future__ import annotations

import asyncio
import logging
import uuid

from auth_plugin.decisions import AuthStats
from provisioning.errors import RegistryUnavailableError
from provisioning.registry import Actor, DeviceRegistry
from provisioning.registry.verifiers import StoredVerifier, VerifierStore

__all__ = ["MAX_AUDITS_IN_FLIGHT", "MAX_UNSAVED_VERIFIERS", "VERIFIER_BATCH_SECONDS", "BackgroundWrites"]

logger = logging.getLogger(__name__)

#: Verifiers made within this many seconds are written in one transaction.
VERIFIER_BATCH_SECONDS = 0.2
#: Verifiers waiting to be written at most (a registry that cannot take them: the oldest go).
MAX_UNSAVED_VERIFIERS = 10_000
#: Background registry writes (refusal audits) at once; more refusals are counted, not written.
MAX_AUDITS_IN_FLIGHT = 8


class BackgroundWrites:
    """Writes that never delay a login's answer, tracked so that shutdown can wait for them."""

    def __init__(self, registry: DeviceRegistry, verifiers: VerifierStore, stats: AuthStats) -> None:
        self._registry = registry
        self._verifiers = verifiers
        self._stats = stats
        #: Every write in flight (audits and the verifier writer).
        self.tasks: set[asyncio.Task[None]] = set()
        # Verifiers made and not yet written, by username (written in batches), and the writer.
        self._unsaved: dict[str, tuple[str, StoredVerifier]] = {}
        self._saving: asyncio.Task[None] | None = None
        self._verifier_write_failures = 0

    async def settle(self, within: float) -> None:
        """Wait (up to ``within`` seconds) for the writes in flight."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=within)

    def audit(self, device_id: uuid.UUID, reason: str) -> None:
        """A folded ``login_refused`` event, written in the background (never delays the answer).

        At most :data:`MAX_AUDITS_IN_FLIGHT` at once: a flood of wrong passwords must not queue
        unbounded writes for the pool's connections (the logins' own reads need them). Refusals
        over the bound are only counted (``stats.audits_dropped``).
        """
        if len(self.tasks) >= MAX_AUDITS_IN_FLIGHT:
            self._stats.audits_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._registry.record_event(
                device_id, "login_refused", actor=Actor.DEVICE, detail={"reason": reason}, fold=True
            ),
            name=f"audit-login-{device_id}",
        )
        self.tasks.add(task)
        task.add_done_callback(self._audited)

    def _audited(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("could not record a login_refused event: %s", task.exception())

    def keep_verifier(self, username: str, stored_hash: str, verifier: StoredVerifier) -> None:
        """Store the verifier of a credential that has just passed bcrypt, in the background.

        Verifiers are written in batches (one transaction for all that arrived within
        :data:`VERIFIER_BATCH_SECONDS`): a cold storm of first logins must not be a storm of
        write transactions on the registry too.
        """
        self._unsaved[username] = (stored_hash, verifier)
        while len(self._unsaved) > MAX_UNSAVED_VERIFIERS:  # the oldest: bcrypt again, at worst
            del self._unsaved[next(iter(self._unsaved))]
        if self._saving is None or self._saving.done():
            self._saving = asyncio.get_running_loop().create_task(self._save_verifiers(), name="verifiers")
            self.tasks.add(self._saving)
            self._saving.add_done_callback(self._saved)

    def _saved(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._saving is task:
            self._saving = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("credential verifiers not stored: %s", task.exception())

    async def _save_verifiers(self) -> None:
        while self._unsaved:
            await asyncio.sleep(VERIFIER_BATCH_SECONDS)
            batch = [(username, *made) for username, made in self._unsaved.items()]
            self._unsaved.clear()
            try:
                await self._verifiers.save_many(batch)
            except RegistryUnavailableError as exc:
                # Their next logins are bcrypt checks again, and store them then: one line per outage.
                if not self._verifier_write_failures:
                    logger.warning("credential verifiers not stored, bcrypt until they are: %s", exc)
                self._verifier_write_failures += len(batch)
                continue
            if self._verifier_write_failures:
                logger.info(
                    "credential verifiers stored again (%d not stored)", self._verifier_write_failures
                )
                self._verifier_write_failures = 0
