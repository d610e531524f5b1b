"""The event loop ``mqttprov serve`` and ``mqttprov authd`` run on: uvloop or asyncio's own.

``[broker] event_loop``: ``auto`` takes uvloop when it can be imported and asyncio's loop
otherwise; ``uvloop`` insists on it (an error when it is missing); ``asyncio`` never uses it.
The choice is made, and logged once, when the process creates its loop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Literal

from broker.errors import ServeError

logger = logging.getLogger(__name__)

#: ``[broker] event_loop`` (the settings model spells out the same three values).
EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop() -> ModuleType | None:
    """The uvloop module, or None when it is not installed (or not built for this platform)."""
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def loop_factory(choice: EventLoopChoice) -> LoopFactory:
    """A factory for ``asyncio.Runner`` that makes the chosen loop and logs which one it made.

    The module is looked up when the loop is made, not here: a missing uvloop is then a
    :class:`ServeError` inside the command's runner, reported as one line like its other errors.
    """

    def make() -> asyncio.AbstractEventLoop:
        uvloop = None if choice == "asyncio" else _uvloop()
        if uvloop is not None:
            logger.info("event loop: uvloop %s", uvloop.__version__)
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
        if choice == "uvloop":
            raise ServeError("event_loop = 'uvloop' but uvloop is not installed (pip install uvloop)")
        if choice == "auto":
            logger.info("event loop: asyncio (uvloop is not installed)")
        else:
            logger.info("event loop: asyncio")
        return asyncio.new_event_loop()

    return make


__all__ = ["EventLoopChoice", "LoopFactory", "loop_factory"]
