"""A private Mosquitto 2.0 for the tests: its own config, dynamic-security file, ACL file and ports.

Two listeners, exactly as docs/mosquitto.md describes them: ``device_port`` where devices,
service accounts, the worker and the bridge log in (dynamic security, no anonymous logins),
and ``provision_port`` where anonymous provisioning sessions may only publish
``provision/request`` and read ``provision/reply/<their own client id>``. The system Mosquitto
on 1883 is never touched.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_ports

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
# Sessions without a username: publish requests only.
topic write provision/request
# Every session on this listener, with or without a username.
pattern write provision/request
pattern read provision/reply/%c
"""

#: The admin role ``mosquitto_ctrl dynsec init`` makes may read every topic ('#'): the bridge's
#: admin needs the control topics only, or it could read provisioning replies.
ADMIN_ACLS = [
    {"acltype": kind, "topic": "$CONTROL/dynamic-security/#", "allow": True}
    for kind in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
]


def mosquitto_missing() -> str | None:
    """Why the Mosquitto tests cannot run here, or None."""
    for path in (MOSQUITTO, MOSQUITTO_CTRL, str(DYNSEC_PLUGIN)):
        if not Path(path).exists():
            return f"{path} not found (Debian packages mosquitto and mosquitto-clients)"
    return None


def mosquitto_conf(directory: Path, device_port: int, provision_port: int) -> str:
    """The configuration file of the private node (the one docs/mosquitto.md shows)."""
    return f"""\
per_listener_settings true
persistence false
# Keep the user that owns these files (mosquitto drops root to 'mosquitto' otherwise).
user {getpass.getuser()}
log_dest file {directory / "mosquitto.log"}
log_type error
log_type warning
log_type notice
log_type information

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
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        """What Mosquitto logged so far."""
        path = self.directory / "mosquitto.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start it and return once both listeners accept connections."""
        conf = self.directory / "mosquitto.conf"
        conf.write_text(mosquitto_conf(self.directory, self.device_port, self.provision_port))
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        waiting = [self.device_port, self.provision_port]
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
def mosquitto_node(directory: Path) -> Iterator[MosquittoNode]:
    """A started private node with files in ``directory``; stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "provisioning.acl").write_text(PROVISIONING_ACL, encoding="utf-8")
    write_dynsec(directory / "dynamic-security.json")
    device_port, provision_port = free_ports(2)
    node = MosquittoNode(directory, device_port, provision_port)
    node.start()
    try:
        yield node
    finally:
        node.stop()
