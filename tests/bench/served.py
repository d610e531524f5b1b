"""Brokers started the way their users start them: ``mqttprov serve`` and amqtt's ``amqtt`` script.

Memory is a property of the whole process a user runs, command-line layer included, so the
memory figure measures these rather than a broker object inside a bench process (whose own
modules would weigh on both sides).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tests.bench.brokers import ANONYMOUS_PLUGIN, cpu_seconds, log_summary
from tests.bench.procs import BenchCrashError, rss_kib
from tests.helpers import console_script, write_config

ServedKind = Literal["mqttprov", "amqtt-anonymous"]
_POLL = 0.05


class ServedBroker:
    """``mqttprov serve --config FILE`` or ``amqtt -c FILE`` on a free loopback port; a context manager."""

    def __init__(
        self,
        kind: ServedKind,
        port: int,
        directory: Path,
        *,
        settings: dict[str, Any] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.kind = kind
        self.port = port
        self.log_file = directory / f"served-{kind}-{port}.log"
        if kind == "mqttprov":
            if settings is None:
                raise ValueError("mqttprov needs its settings")
            # The broker alone unless a figure asks for the API (on by default, on a fixed port).
            settings = {**settings, "api": {"enabled": False, **settings.get("api", {})}}
            config = write_config(directory / f"mqttprov-{port}.toml", settings)
            argv = [console_script("mqttprov"), "serve", "--config", str(config)]
        else:
            config = directory / f"amqtt-{port}.yaml"
            amqtt_config = {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {ANONYMOUS_PLUGIN: {"allow_anonymous": True}},
            }
            config.write_text(json.dumps(amqtt_config), encoding="utf-8")  # JSON is YAML
            argv = [console_script("amqtt"), "-c", str(config)]
        self._argv = argv
        self._directory = directory
        self.log_file.write_bytes(b"")
        self._start(start_timeout)

    def _start(self, timeout: float) -> None:
        offset = self.log_file.stat().st_size
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                self._argv,
                cwd=self._directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C is ours to handle; we stop it in __exit__
            )
        try:
            self._wait_listening(timeout, offset)
        except BaseException:
            self.stop()
            raise

    def restart(self, start_timeout: float = 60.0) -> tuple[float, float]:
        """Stop (SIGTERM) and start again with the same files; seconds to stop, and to listen again."""
        began = time.monotonic()
        self.stop()
        stopped = time.monotonic()
        self._start(start_timeout)
        return stopped - began, time.monotonic() - stopped

    @property
    def pid(self) -> int:
        """The broker's process id (the console script runs in the interpreter itself)."""
        return self._process.pid

    def rss_kib(self) -> int:
        """The broker process's resident set size in KiB."""
        return rss_kib(self.pid)

    def _wait_listening(self, timeout: float, offset: int) -> None:
        # What each logs once its listener is open; not a probe connection, which amqtt would log
        # as a failed session and which would count in the broker's own figures. Only what this
        # start wrote counts (from ``offset``): the log file keeps every start's lines.
        needle = b"broker started" if self.kind == "mqttprov" else b"Listener 'default' bind to"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_file.read_bytes()[offset:]:
                return
            if self._process.poll() is not None:
                raise BenchCrashError(f"{self.kind} exited with {self._process.returncode}:\n{self._tail()}")
            time.sleep(_POLL)  # the bench, not a test: a log file has nothing to wait on
        raise BenchCrashError(f"{self.kind} not listening on {self.port} within {timeout}s:\n{self._tail()}")

    def _tail(self, lines: int = 10) -> str:
        text = self.log_file.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def log_summary(self, limit: int = 3) -> list[str]:
        """What the broker logged at WARNING and above: a count and the first distinct lines."""
        return log_summary(self.kind, self.log_file, limit)

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the running broker process has used so far."""
        return cpu_seconds(self.pid)

    def log_offset(self) -> int:
        """How much the broker has logged so far (bytes): where "from now on" starts."""
        return self.log_file.stat().st_size

    def wait_idle(
        self,
        timeout: float,
        *,
        log_line: bytes | None = None,
        since: int = 0,
        busy_below: float = 0.05,
        window: float = 0.5,
    ) -> tuple[float, str]:
        """Wait until the broker has finished its idle-time work (filling its credential pool).

        Done when ``log_line`` appears in the log after offset ``since``, or when the process has
        used under ``busy_below`` of a core for two measuring windows in a row (the work shows as
        CPU, and nothing else). Returns the seconds waited and which came first (or "timeout").
        """
        began = time.monotonic()
        quiet = 0
        used = self.cpu_seconds()
        while time.monotonic() - began < timeout:
            if log_line is not None and log_line in self.log_file.read_bytes()[since:]:
                return time.monotonic() - began, "log line"
            time.sleep(window)  # one measuring window of /proc/<pid>/stat
            now = self.cpu_seconds()
            quiet = quiet + 1 if (now - used) / window < busy_below else 0
            used = now
            if quiet >= 2:
                return time.monotonic() - began, "CPU idle"
        return time.monotonic() - began, "timeout"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s (idempotent)."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(30.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
