"""Child processes of the bench: spawned, driven over a pipe, always reaped.

Every child ignores SIGINT (Ctrl-C reaches the whole process group); the parent stops its
children in ``finally`` blocks, politely first and with SIGKILL as the last resort.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from tests.bench.load import Task, child_main
from tests.bench.logins import LoginTask
from tests.bench.subscriptions import SubscriptionTask

SPAWN = multiprocessing.get_context("spawn")


class BenchCrashError(Exception):
    """A child process failed: the figure is reported as crashed (the bench exits non-zero)."""


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from ``/proc/<pid>/status`` (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchCrashError(f"no VmRSS for process {pid}")


def reap(process: BaseProcess, timeout: float = 10.0) -> None:
    """Wait for ``process`` to end; terminate, then kill, if it does not."""
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)


class Child:
    """A spawned process with a duplex pipe: messages are ``(kind, payload)`` tuples."""

    def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        self.name = name
        self._pipe, child_end = SPAWN.Pipe()
        self.process = SPAWN.Process(target=target, args=(*args, child_end), name=name, daemon=True)
        self.process.start()
        child_end.close()

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.process.pid is not None
        return self.process.pid

    def send(self, message: Any) -> None:
        """Send a command to the child."""
        self._pipe.send(message)

    def expect(self, kind: str, timeout: float) -> Any:
        """The payload of the child's next message, which must be ``kind``."""
        if not self._pipe.poll(timeout):
            raise BenchCrashError(f"{self.name}: no {kind!r} within {timeout:.0f} s")
        try:
            got, payload = self._pipe.recv()
        except EOFError as exc:
            raise BenchCrashError(f"{self.name}: exited (code {self.process.exitcode})") from exc
        if got == "error":
            raise BenchCrashError(f"{self.name} failed:\n{payload}")
        if got != kind:
            raise BenchCrashError(f"{self.name}: expected {kind!r}, got {got!r}")
        return payload

    def close(self, timeout: float = 10.0) -> None:
        """Close the pipe (a waiting child sees EOF and ends), then reap the process (idempotent)."""
        self._pipe.close()
        reap(self.process, timeout)


class LoadProcess(Child):
    """One load generator running one :mod:`tests.bench.load` task."""

    def __init__(self, task: Task | LoginTask | SubscriptionTask, name: str) -> None:
        super().__init__(child_main, (task,), name)


def run_load(
    tasks: Sequence[Task | LoginTask | SubscriptionTask], timeout: float, label: str = "load"
) -> list[Any]:
    """Start one process per task, wait until all are ready, start them together, collect results."""
    children: list[LoadProcess] = []
    try:
        for index, task in enumerate(tasks):
            children.append(LoadProcess(task, f"{label}-{index}"))
        for child in children:
            child.expect("ready", 60.0)
        for child in children:
            child.send("go")
        return [child.expect("result", timeout) for child in children]
    finally:
        for child in children:
            child.close()
