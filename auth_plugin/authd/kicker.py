"""Close a revoked user's live connections on a broker whose HTTP auth cannot (RabbitMQ).

The HTTP backend refuses the next login at once; a connection that is already open is only closed
by the broker itself. ``[authd] kick_command`` is that command, run without a shell; for RabbitMQ
3.10 a ``rabbitmqctl eval`` over the MQTT plugin's cluster-wide client-id registry (the exact
command is in docs/scaling-out.md): ``close_all_user_connections`` does not close MQTT connections.
Usernames are put into the command only when they are plain (letters, digits, ``_ . -``), so a
username can never change what the command does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

_PLAIN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class CommandKicker:
    """Runs the configured command once per revoked username."""

    def __init__(self, command: Sequence[str], *, timeout: float = 15.0) -> None:
        self._command = tuple(command)
        self._timeout = timeout
        self.kicked = 0
        self.failed = 0

    def argv(self, username: str) -> list[str]:
        """The command line for one username (``{username}`` filled in)."""
        return [part.replace("{username}", username) for part in self._command]

    async def kick(self, username: str) -> bool:
        """Run the command; True when it exited 0 within the timeout."""
        if not _PLAIN.fullmatch(username):
            self.failed += 1
            logger.error("kick username=%r refused: not a plain username", username)
            return False
        try:
            returncode, output = await self._run(self.argv(username))
        except OSError as exc:
            returncode, output = None, f"cannot run {self._command[0]}: {exc}"
        except TimeoutError:
            returncode, output = None, f"no answer within {self._timeout:.0f}s"
        if returncode != 0:
            self.failed += 1
            logger.error("kick username=%s failed (exit %s): %s", username, returncode, output)
            return False
        self.kicked += 1
        logger.info("kicked live connections of username=%s", username)
        return True

    async def _run(self, argv: list[str]) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(self._timeout):
                raw, _ = await process.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        last = raw.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return process.returncode, last[0][:200]
