"""Brokers under test, each in a process of its own, on free loopback ports (never 1883).

A runner process starts :class:`broker.BrokerServer` or a bare :class:`amqtt.broker.Broker`
and says ``ready`` over its pipe once the listener accepts connections; the parent asks it for
``stats`` and finally ``stop``. Mosquitto runs as a subprocess with a private configuration
and is ready when it logs that it is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tests.bench.procs import BenchCrashError, Child, rss_kib

MOSQUITTO = Path("/usr/sbin/mosquitto")
BrokerKind = Literal["mqttprov", "amqtt-anonymous", "amqtt-auth-db"]
ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"
AUTH_DB_PLUGIN = "amqtt.contrib.auth_db.UserAuthDBPlugin"


@dataclass(frozen=True)
class BrokerSpec:
    """What to run: our broker with these settings, or bare amqtt with one auth plugin."""

    kind: BrokerKind
    port: int
    #: ``config.Settings`` as a dict (mqttprov only).
    settings: dict[str, Any] | None = None
    #: SQLAlchemy URL of amqtt's ``auth_db`` users (amqtt-auth-db only).
    auth_db_url: str | None = None
    #: bcrypt rounds amqtt's hasher uses; equal to the stored hashes' cost, so it never rehashes.
    auth_db_rounds: int = 10


def broker_main(spec: BrokerSpec, log_file: str, pipe: Pipe) -> None:
    """Entry point of a broker process; warnings and errors go to ``log_file``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        filename=log_file, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(spec, pipe))
    except BaseException:
        with contextlib.suppress(OSError):
            pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


def _recv(pipe: Pipe) -> Any:
    try:
        return pipe.recv()
    except EOFError:
        return "stop"  # the parent is gone


async def _serve(spec: BrokerSpec, pipe: Pipe) -> None:
    async with _running(spec) as stats:
        pipe.send(("ready", {"pid": os.getpid()}))
        while True:
            command = await asyncio.to_thread(_recv, pipe)
            if command == "stats":
                pipe.send(("stats", stats() | {"rss_kib": rss_kib(os.getpid())}))
            else:
                break
    pipe.send(("stopped", None))


@contextlib.asynccontextmanager
async def _running(spec: BrokerSpec) -> AsyncIterator[Callable[[], dict[str, Any]]]:
    if spec.kind == "mqttprov":
        async with _mqttprov(spec) as stats:
            yield stats
        return
    from amqtt.broker import Broker  # noqa: PLC0415 - heavy; only in the broker process

    plugins: dict[str, dict[str, Any]]
    if spec.kind == "amqtt-auth-db":
        plugins = {AUTH_DB_PLUGIN: {"connection": spec.auth_db_url, "hash_schemes": ["bcrypt"]}}
        _auth_db_rounds(spec.auth_db_rounds)
    else:
        plugins = {ANONYMOUS_PLUGIN: {"allow_anonymous": True}}
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{spec.port}"}}, "plugins": plugins}
    broker = Broker(config)
    await broker.start()
    try:
        yield dict
    finally:
        await broker.shutdown()


def _auth_db_rounds(rounds: int) -> None:
    """Make amqtt's (singleton) hasher use our cost: it would otherwise rehash at cost 12 per login."""
    from amqtt.contrib.auth_db.models import PasswordHasher  # noqa: PLC0415
    from pwdlib.hashers.bcrypt import BcryptHasher  # noqa: PLC0415

    PasswordHasher(hashers=[BcryptHasher(rounds=rounds)])


@contextlib.asynccontextmanager
async def _mqttprov(spec: BrokerSpec) -> AsyncIterator[Callable[[], dict[str, Any]]]:
    from broker.core import settle_heap  # noqa: PLC0415
    from broker.embedded import BrokerServer  # noqa: PLC0415
    from config import Settings  # noqa: PLC0415

    async with BrokerServer(Settings.model_validate(spec.settings)) as server:
        settle_heap()  # as ``mqttprov serve`` does once started

        def stats() -> dict[str, Any]:
            authenticator = server.services.authenticator
            return asdict(authenticator.stats) | {
                "bcrypt_workers": server.hasher.workers,
                "seconds_per_check": server.hasher.seconds_per_check,
                "cached_logins": len(authenticator.cache),
            }

        yield stats


_LEVELS = ("WARNING", "ERROR", "CRITICAL")


def log_summary(name: str, log_file: Path, limit: int = 3) -> list[str]:
    """The lines of ``log_file`` that name WARNING or a worse level: a count and the first few."""
    if not log_file.is_file():
        return []
    records = [
        line
        for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        if any(level in line for level in _LEVELS)
    ]
    if not records:
        return []
    distinct = list(dict.fromkeys(line[:160] for line in records))
    shown = [f"  {line}{'...' if len(line) == 160 else ''}" for line in distinct[:limit]]
    return [f"{name} broker logged {len(records)} warning(s)/error(s), e.g.:", *shown]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BrokerProcess:
    """A running broker under test; use as a context manager (stopped and reaped on exit)."""

    def __init__(self, spec: BrokerSpec, log_dir: Path, *, start_timeout: float = 60.0) -> None:
        self.spec = spec
        self.port = spec.port
        self.log_file = log_dir / f"{spec.kind}-{spec.port}.log"
        self._child = Child(broker_main, (spec, str(self.log_file)), f"broker-{spec.kind}")
        try:
            self._child.expect("ready", start_timeout)
        except BaseException:
            self._child.close(5.0)
            raise

    @property
    def pid(self) -> int:
        """The broker's process id."""
        return self._child.pid

    def stats(self) -> dict[str, Any]:
        """The broker's counters and its RSS (KiB)."""
        self._child.send("stats")
        stats: dict[str, Any] = self._child.expect("stats", 30.0)
        return stats

    def rss_kib(self) -> int:
        """The broker process's resident set size in KiB."""
        return rss_kib(self.pid)

    def log_summary(self, limit: int = 3) -> list[str]:
        """What the broker logged (WARNING and above): a count and the first distinct lines, cut short."""
        return log_summary(self.spec.kind, self.log_file, limit)

    def stop(self) -> None:
        """Shut the broker down cleanly; kill it if it does not stop in time (idempotent)."""
        if not self._child.process.is_alive():
            self._child.close(0.1)
            return
        try:
            self._child.send("stop")
            self._child.expect("stopped", 30.0)
        except (BenchCrashError, OSError):
            pass
        finally:
            self._child.close(10.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Mosquitto:
    """A private Mosquitto on a free loopback port, anonymous; a context manager."""

    def __init__(
        self, port: int, directory: Path, *, start_timeout: float = 15.0, connection_messages: bool = False
    ) -> None:
        self.port = port
        conf = directory / f"mosquitto-{port}.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # On: a line per connect and disconnect, as the dynamic-security node under test logs.
            f"connection_messages {'true' if connection_messages else 'false'}\n"
            "log_dest stderr\n"  # unbuffered: stdout to a pipe is flushed only at exit
            "log_type information\n"
            "log_type error\n"
            "log_type warning\n",
            encoding="ascii",
        )
        self._process = subprocess.Popen(
            [str(MOSQUITTO), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C is ours to handle; we stop it in __exit__
        )
        try:
            self._wait_running(start_timeout)
        except BaseException:
            self.stop()
            raise
        # Keep reading its output so that it can never block on a full pipe.
        self._drain = threading.Thread(target=self._discard, name="mosquitto-output", daemon=True)
        self._drain.start()

    @staticmethod
    def available() -> bool:
        """True when the Mosquitto binary is installed."""
        return MOSQUITTO.is_file() and os.access(MOSQUITTO, os.X_OK)

    @property
    def pid(self) -> int:
        """Mosquitto's process id."""
        return self._process.pid

    def _wait_running(self, timeout: float) -> None:
        assert self._process.stderr is not None
        fd = self._process.stderr.fileno()
        output = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0.0))
            if not readable:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            output += chunk
            if b" running" in output:
                return
        shown = output.decode(errors="replace").strip().splitlines()[-10:]
        raise BenchCrashError("mosquitto did not start:\n" + "\n".join(shown))

    def _discard(self) -> None:
        assert self._process.stderr is not None
        fd = self._process.stderr.fileno()
        with contextlib.suppress(OSError):
            while os.read(fd, 65536):
                pass

    def rss_kib(self) -> int:
        """Mosquitto's resident set size in KiB."""
        return rss_kib(self.pid)

    def stop(self) -> None:
        """Terminate Mosquitto and wait for it (idempotent)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5.0)
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.join(5.0)
        if self._process.stderr is not None:
            self._process.stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
