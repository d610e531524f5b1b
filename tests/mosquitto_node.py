"""A private Mosquitto 2.0 for the tests: its own config, dynamic-security file, ACL file and ports.

Two listeners, exactly as docs/mosquitto.md describes them: ``device_port`` where devices,
service accounts, the worker and the bridge log in (dynamic security, no anonymous logins),
and ``provision_port`` where anonymous provisioning sessions may only publish
``provision/request`` and read ``provision/reply/<their own client id>``. The system Mosquitto
on 1883 is never touched.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.external.mosquitto.runtime import run_bridge, run_mosquitto_worker
from config import Settings
from provisioning.external.link import parse_broker_url
from provisioning.registry import DeviceRegistry, create_engine
from provisioning.registry.accounts import AccountRegistry
from provisioning.registry.migrate import upgrade
from tests.helpers import free_port, free_ports, run_mqttprov, self_signed_cert, write_config
from tests.mqtt_clients import ACCEPTED, SUBACK_FAILURE, WAIT, Client, request_provisioning
from tests.test_serve import ServeProcess

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
ADMIN = "mqttprov-admin"
ADMIN_PASSWORD = "admin-password-for-tests-0003"
WORKER = "mqttprov-worker"
WORKER_PASSWORD = "worker-password-for-tests-0004"
START_TIMEOUT = 10.0

#: What anonymous provisioning sessions may do (the provisioning listener's acl_file).
PROVISIONING_ACL = """\
# Sessions without a username, and firmware that logs in as 'provision': publish requests.
topic write provision/request
user provision
topic write provision/request
# Every session on this listener, whatever its username: read its own reply topic only.
pattern read provision/reply/%c
"""

#: The admin role ``mosquitto_ctrl dynsec init`` makes may read every topic ('#'): the bridge's
#: admin needs the control topics only, or it could read provisioning replies. What is left of
#: the role after docs/mosquitto.md's ``removeRoleACL`` commands (tests/test_mosquitto_docs.py).
ADMIN_ACLS = [
    {"acltype": kind, "topic": "$CONTROL/dynamic-security/#", "allow": True}
    for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
]


def mosquitto_missing() -> str | None:
    """Why the Mosquitto tests cannot run here, or None."""
    for path in (MOSQUITTO, MOSQUITTO_CTRL, str(DYNSEC_PLUGIN)):
        if not Path(path).exists():
            return f"{path} not found (Debian packages mosquitto and mosquitto-clients)"
    return None


def mosquitto_conf(
    directory: Path, device_port: int, provision_port: int, tls_port: int | None = None
) -> str:
    """The configuration file of the private node (the one docs/mosquitto.md shows)."""
    return _base_conf(directory, device_port, provision_port) + (
        _tls_conf(directory, tls_port) if tls_port else ""
    )


def _tls_conf(directory: Path, tls_port: int) -> str:
    return f"""
# The device listener's twin over TLS (certificate made by the test).
listener {tls_port} 127.0.0.1
allow_anonymous false
certfile {directory / "cert.pem"}
keyfile {directory / "key.pem"}
plugin {DYNSEC_PLUGIN}
plugin_opt_config_file {directory / "dynamic-security.json"}
"""


def node_only_conf(directory: Path) -> str:
    """What a test's node adds to docs/mosquitto.md's lines: its user, its log file."""
    return f"""\
# Keep the user that owns these files (mosquitto drops root to 'mosquitto' otherwise).
user {getpass.getuser()}
log_dest file {directory / "mosquitto.log"}
log_type error
log_type warning
log_type notice
log_type information
"""


def _base_conf(directory: Path, device_port: int, provision_port: int) -> str:
    return f"""\
per_listener_settings true
persistence false
{node_only_conf(directory)}
# Devices, service accounts, the worker and the bridge: dynamic security, nobody anonymous.
listener {device_port} 127.0.0.1
allow_anonymous false
plugin {DYNSEC_PLUGIN}
plugin_opt_config_file {directory / "dynamic-security.json"}

# Provisioning sessions: anonymous, confined by the ACL file's %c pattern.
listener {provision_port} 127.0.0.1
allow_anonymous true
acl_file {directory / "provisioning.acl"}
"""


def write_dynsec(path: Path) -> None:
    """``mosquitto_ctrl dynsec init`` with our admin, then narrow the admin role to the control topics."""
    subprocess.run(
        [MOSQUITTO_CTRL, "dynsec", "init", str(path), ADMIN, ADMIN_PASSWORD],
        check=True,
        capture_output=True,
        timeout=30,
    )
    data = json.loads(path.read_text(encoding="utf-8"))
    for role in data["roles"]:
        if role["rolename"] == "admin":
            role["acls"] = ADMIN_ACLS
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


@dataclass
class MosquittoNode:
    """One running private Mosquitto."""

    directory: Path
    device_port: int
    provision_port: int
    tls_port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    #: The configuration file to run instead of :func:`mosquitto_conf`'s.
    conf: Path | None = None

    @property
    def log(self) -> str:
        """What Mosquitto logged so far."""
        path = self.directory / "mosquitto.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start it and return once both listeners accept connections."""
        conf = self.conf
        if conf is None:
            conf = self.directory / "mosquitto.conf"
            conf.write_text(
                mosquitto_conf(self.directory, self.device_port, self.provision_port, self.tls_port)
            )
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        waiting = [self.device_port, self.provision_port] + ([self.tls_port] if self.tls_port else [])
        while waiting:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {stderr}{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen within {START_TIMEOUT}s: {self.log}")
            if _accepts(waiting[0]):
                waiting.pop(0)
            else:
                time.sleep(0.02)  # the polling interval against the deadline above

    def stop(self) -> None:
        """Terminate it (SIGTERM, then SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def mosquitto_node(directory: Path, *, tls: bool = False) -> Iterator[MosquittoNode]:
    """A started private node with files in ``directory`` (``tls``: also a TLS listener, its
    self-signed certificate in ``directory/cert.pem``); stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "provisioning.acl").write_text(PROVISIONING_ACL, encoding="utf-8")
    write_dynsec(directory / "dynamic-security.json")
    if tls:
        self_signed_cert(directory)
    device_port, provision_port, tls_port = free_ports(3)
    node = MosquittoNode(directory, device_port, provision_port, tls_port if tls else None)
    node.start()
    try:
        yield node
    finally:
        node.stop()


# -- the whole stack: Mosquitto, the registry, the bridge and workers -----------------------------

#: Mosquitto's promise for a revoked client, and ours: thrown off within 2 s.
KICK_WITHIN = 2.0


@dataclass
class Stack:
    """A private Mosquitto, the registry, and the bridge and workers serving it."""

    node: MosquittoNode
    settings: Settings
    config: Path
    devices: DeviceRegistry
    accounts: AccountRegistry
    tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)

    async def start(self, name: str) -> None:
        """Start ``bridge`` or a worker (``worker``, ``worker-2``, ...) and wait until it is set up."""
        runner = run_bridge if name == "bridge" else run_mosquitto_worker
        address = parse_broker_url(self.settings.external.broker)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(runner(self.settings, address, stop, ready), name=f"test-{name}")
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task in done:
            task.result()
        assert waiter in done, f"{name} not ready within {WAIT}s"
        self.tasks[name] = (task, stop)

    async def stop(self, name: str) -> None:
        """Stop the bridge or a worker (cleanly, as on SIGTERM)."""
        task, stop = self.tasks.pop(name)
        stop.set()
        await asyncio.wait_for(task, WAIT)

    def provision(self, mac: str, client_id: str | None = None) -> dict[str, Any] | None:
        """One exchange on the provisioning listener (blocking: call through to_thread)."""
        return request_provisioning(self.node.provision_port, client_id or mac, {"mac": mac})

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``mqttprov ARGS --config ...`` as a process (blocking)."""
        return run_mqttprov(*args, "--config", str(self.config), cwd=self.config.parent)


def stack_sections(node: MosquittoNode, database_url: str) -> dict[str, dict[str, Any]]:
    """The configuration of mqttprov in front of ``node`` (written to the CLI's TOML file too);
    the worker and the bridge use the TLS listener when the node has one."""
    return {
        "broker": {
            "host": "127.0.0.1",
            "port": free_port(),
            "advertised_host": "127.0.0.1",
            "advertised_port": node.device_port,
        },
        "database": {"url": database_url},
        "auth": {"bcrypt_cost": 4, "revocation_poll_interval": 0.2},
        "external": {
            **(
                {"broker": f"mqtts://127.0.0.1:{node.tls_port}", "ca_file": node.directory / "cert.pem"}
                if node.tls_port
                else {"broker": f"mqtt://127.0.0.1:{node.device_port}"}
            ),
            "admin_username": ADMIN,
            "admin_password": ADMIN_PASSWORD,
            "worker_username": WORKER,
            "worker_password": WORKER_PASSWORD,
        },
    }


@asynccontextmanager
async def mosquitto_stack(
    directory: Path,
    database_url: str,
    *,
    options: dict[str, dict[str, Any]] | None = None,
    tls: bool = False,
) -> AsyncIterator[Stack]:
    """Mosquitto, a migrated registry, the bridge and one worker, all running; stopped on exit.

    ``options``: extra keys per configuration section; ``tls``: a third, TLS listener.
    """
    with mosquitto_node(directory / "mosquitto", tls=tls) as node:
        sections = stack_sections(node, database_url)
        for section, values in (options or {}).items():
            sections[section] = sections.get(section, {}) | values
        settings = Settings.model_validate(sections)
        config = write_config(directory / "mqttprov.toml", sections)
        engine = create_engine(database_url)
        await upgrade(engine)
        stack = Stack(node, settings, config, DeviceRegistry(engine), AccountRegistry(engine))
        try:
            await stack.start("bridge")
            await stack.start("worker")
            yield stack
        finally:
            for name in list(stack.tasks):
                await stack.stop(name)
            await engine.dispose()


async def call(work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking MQTT helper off the loop (the worker and bridge run on it)."""
    return await asyncio.to_thread(work, *args, **kwargs)


def spy(port: int, client_id: str, *filters: str, **login_args: Any) -> Client:
    """A connected client subscribed to ``filters`` (each subscription must be granted)."""
    client = Client(port, client_id, **login_args)
    assert client.connect() == ACCEPTED
    for topic_filter in filters:
        assert client.subscribe(topic_filter) != SUBACK_FAILURE
    return client


async def killed(processes: Iterable[ServeProcess]) -> None:
    """Kill the ``mqttprov`` processes that still run (after a failure)."""
    for process in processes:
        if process.process.returncode is None:
            process.process.kill()
            await process.process.communicate()
