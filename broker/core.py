"""What every serving process shares: the registry, the bcrypt pool and the authenticator it builds
first, and the way it runs until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, Self

from auth_plugin.authenticator import Authenticator
from config import Settings
from provisioning.passwords import PasswordHasher
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthCore:
    """One engine shared by both repositories, one bcrypt pool, the authenticator over them."""

    registry: DeviceRegistry
    accounts: AccountRegistry
    hasher: PasswordHasher
    authenticator: Authenticator

    async def close(self) -> None:
        """Let background writes finish, stop the bcrypt workers and dispose the engine."""
        # Logins still waiting for a bcrypt turn are answered "try again", not left to a closed pool.
        self.authenticator.budget.close()
        try:
            await self.authenticator.settle()
        finally:
            self.hasher.close()
            await self.registry.close()


def auth_core(settings: Settings, *, answer_within: float | None = None) -> AuthCore:
    """Build the core from the settings (nothing is connected yet).

    ``answer_within``: seconds a caller waits for a decision, when less than the CONNECT timeout
    (authd's ``request_timeout``); logins that could not be checked in time are refused at once.
    """
    engine = create_engine(settings.database.url, pool_size=settings.database.pool_size)
    registry = DeviceRegistry(engine)
    accounts = AccountRegistry(engine)
    hasher = PasswordHasher(settings.auth.bcrypt_cost, workers=settings.auth.bcrypt_workers)
    authenticator = Authenticator(registry, accounts, hasher, settings, answer_within=answer_within)
    return AuthCore(registry, accounts, hasher, authenticator)


@contextlib.asynccontextmanager
async def signals_handled(stop: asyncio.Event) -> AsyncIterator[None]:
    """While inside: SIGINT and SIGTERM set ``stop``; SIGHUP, which by default ends a process, is
    answered with one log line and nothing else (nothing is reloaded: a configuration change takes
    a restart), so a ``kill -HUP`` or a closed controlling terminal never takes a process down."""
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    handlers: list[tuple[signal.Signals, Callable[..., None], tuple[object, ...]]] = [
        (signal.SIGINT, _request_stop, (stop, signal.SIGINT)),
        (signal.SIGTERM, _request_stop, (stop, signal.SIGTERM)),
        (signal.SIGHUP, _ignore_hangup, ()),
    ]
    for sig, handler, args in handlers:
        # Not on the main thread (tests), signals cannot be handled: ``stop`` still works.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler, *args)
            handled.append(sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def run_until_signalled(
    service: AbstractAsyncContextManager[object], stop: asyncio.Event | None = None
) -> None:
    """Enter ``service``, wait for SIGINT/SIGTERM (or for ``stop``), then leave it cleanly."""
    stop_event = stop or asyncio.Event()
    async with signals_handled(stop_event), service:
        settle_heap()
        await stop_event.wait()


async def run_main_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``, which returns once ``stop`` is set; SIGINT or SIGTERM sets it."""
    stop = asyncio.Event()
    async with signals_handled(stop):
        await main(stop)


#: How long a background loop gets to finish its round once asked to stop, before it is cancelled.
STOP_TIMEOUT = 5.0
#: First and longest pause before a background loop that died is started again.
RESTART_BACKOFF = 1.0
MAX_RESTART_BACKOFF = 30.0


class BackgroundLoop(Protocol):
    """A loop that runs until asked to stop after its round in progress."""

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        ...

    def request_stop(self) -> None:
        """Make :meth:`run` return after its round in progress."""
        ...

    async def run(self) -> None:
        """Run until :meth:`request_stop`."""
        ...


class Supervised:
    """Runs a background loop in a named task and starts it again, with backoff, when it dies.

    A loop is meant to survive its dependencies' failures by itself; one that raises anyway (a
    bug) or returns without being asked is logged at ERROR, with the traceback, and restarted:
    never silently gone.
    """

    def __init__(self, name: str, loop: BackgroundLoop) -> None:
        self.name = name
        self._loop = loop
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Times the loop was started again after it died.
        self.restarts = 0

    def start(self) -> Self:
        """Start the loop in a task of its own (call once, from the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)
        return self

    def request_stop(self) -> None:
        """Stop the loop after its round, and any pause before a restart at once."""
        self._stop.set()
        self._loop.request_stop()

    async def stop(self, *, within: float = STOP_TIMEOUT) -> None:
        """Stop the loop and wait for it (see :func:`end_background`)."""
        if self._task is not None:
            await end_background(self._task, self.request_stop, within=within)

    async def _supervise(self) -> None:
        backoff = RESTART_BACKOFF
        while True:
            try:
                await self._loop.run()
            except Exception:
                if self._loop.stopping:
                    logger.exception("%s failed while stopping", self.name)
                    return
                logger.exception("%s died; restarting it in %.0f s", self.name, backoff)
            else:
                if self._loop.stopping:
                    return
                logger.error("%s returned unasked; restarting it in %.0f s", self.name, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            if self._loop.stopping or self._stop.is_set():
                return
            self.restarts += 1
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF)


async def end_background(
    task: asyncio.Task[None], request_stop: Callable[[], None], *, within: float = STOP_TIMEOUT
) -> None:
    """Ask a background loop to return after its round in progress, and wait for it.

    Cancelled only when it has not returned within ``within`` seconds (a database that hangs): a
    query cut off mid-way leaves its connection to the garbage collector, and a write loses
    what it was writing.
    """
    request_stop()
    _, pending = await asyncio.wait({task}, timeout=within)
    if pending:
        logger.warning("%s did not stop within %.0f s: cancelled", task.get_name(), within)
        task.cancel()
        # Bounded too: a loop that ignores its cancellation must not hold the shutdown.
        await asyncio.wait({task}, timeout=within)
    if task.done() and not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        logger.error("%s ended with an error", task.get_name(), exc_info=exc)


def settle_heap() -> None:
    """Collect once, then exempt everything start-up left alive from later garbage collections.

    A started process holds a few hundred thousand objects that live as long as it does (the
    modules, SQLAlchemy's and pydantic's schemas, compiled statements, the settings), and every
    full collection would walk them all again. amqtt makes many short-lived objects per
    connection, so a reconnect storm triggers a full collection every few hundred connections:
    measured before the freeze, about 0.3 ms of the loop per reconnect (docs/benchmarks.md).
    Frozen, a full collection walks only what came after.
    """
    gc.collect()
    gc.freeze()
    logger.debug("%d start-up objects exempted from garbage collection", gc.get_freeze_count())


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    logger.info("received %s, shutting down", sig.name)
    stop.set()


def _ignore_hangup() -> None:
    logger.info("received SIGHUP: nothing reloaded (restart to apply configuration changes)")
