"""A reader's place in the credential change feed: every follower reads it the same way.

The feed (``credential_changes``, written by :func:`~provisioning.registry.transactions.record_change`
in the transaction that changes a credential) is read forward from a position. The revocation
follower of a broker and the Mosquitto bridge both keep one :class:`ChangeFeed`; what they do with
the usernames it hands them is theirs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from provisioning.registry.repository import DeviceRegistry

__all__ = ["ChangeFeed"]


class ChangeFeed:
    """A position in the feed, moved only past changes that were applied."""

    def __init__(self, devices: DeviceRegistry, position: int | None = None) -> None:
        self._devices = devices
        #: The id of the newest change applied; None until the feed was first read.
        self.position = position

    async def start(self) -> int:
        """Take the feed's newest change as the position (returned): what came before it is not
        applied. Raises :class:`~provisioning.registry.RegistryUnavailableError` (and SQLAlchemy's
        errors)."""
        self.position = await self._devices.last_change_id()
        return self.position

    async def read(self, apply: Callable[[set[str]], Awaitable[None]]) -> None:
        """Hand the usernames changed after the position to ``apply``, then move past them.

        Starts at the newest change when no position was taken. When ``apply`` raises, the
        position stays where it was: the same changes are handed over again next time (applying
        twice must be harmless). Database errors propagate likewise.
        """
        position = self.position if self.position is not None else await self.start()
        changes = await self._devices.changes_since(position)
        if changes:
            await apply({username for _, username, _ in changes})
            self.position = changes[-1][0]
