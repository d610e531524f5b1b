"""A private two-node RabbitMQ 3.10 cluster for the authd tests, never the system node.

Each node has its own name, ports, data, log and configuration under one temporary directory;
both share a private Erlang cookie (``HOME`` of the nodes and of ``rabbitmqctl``) and a private
``epmd`` on a free loopback port that the cluster starts and stops itself. The distribution ports
listen on loopback only. The scripts under ``/usr/lib/rabbitmq/bin`` run as the current user (the
``/usr/sbin`` wrappers would switch to the ``rabbitmq`` user and write ``/var/log/rabbitmq``).
Startup is slow (~10 s a node): use one cluster per test module.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_ports

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_SERVER = RABBITMQ_BIN / "rabbitmq-server"
RABBITMQCTL = RABBITMQ_BIN / "rabbitmqctl"
START_TIMEOUT = 90.0
#: What anonymous MQTT connections log in as: authd sees them as provisioning sessions.
ANONYMOUS_USER = "provision"
#: ``rabbitmqctl eval`` expression that closes every MQTT connection of ``{username}`` in the
#: cluster (the client-id registry is cluster-wide). ``close_all_user_connections`` exits 0 but
#: does not close MQTT connections in RabbitMQ 3.10.
KICK_EXPRESSION = (
    'U = <<"{username}">>, '
    '[rabbit_mqtt_reader:close_connection(P, "credentials revoked by mqttprov") '
    "|| {_, P} <- rabbit_mqtt_collector:list(), "
    "lists:member({user, U}, rabbit_mqtt_reader:info(P, [user]))]."
)


def rabbitmq_missing() -> str | None:
    """Why the RabbitMQ tests cannot run here, or None."""
    for path in (RABBITMQ_SERVER, RABBITMQCTL):
        if not path.exists():
            return f"{path} not found (Debian package rabbitmq-server)"
    if shutil.which("epmd") is None:
        return "epmd not found (Debian package erlang-base)"
    return None


def rabbitmq_conf(mqtt_port: int, authd_url: str, auth_cache_ttl_ms: int | None = None) -> str:
    """A node's rabbitmq.conf: MQTT on loopback, authd as the only auth backend (docs/scaling-out.md).

    With ``auth_cache_ttl_ms``, RabbitMQ's ``rabbitmq_auth_backend_cache`` sits in front of the
    HTTP backend and keeps every allowed answer for that long (refusals are not cached).
    """
    backend = "auth_backends.1 = http\n"
    if auth_cache_ttl_ms is not None:
        backend = (
            "auth_backends.1 = cache\n"
            "auth_cache.cached_backend = http\n"
            f"auth_cache.cache_ttl = {auth_cache_ttl_ms}\n"
        )
    return f"""\
listeners.tcp = none
mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}
mqtt.allow_anonymous = true
mqtt.default_user = {ANONYMOUS_USER}
mqtt.default_pass = {ANONYMOUS_USER}
mqtt.vhost = /
mqtt.exchange = amq.topic
{backend}auth_http.http_method = post
auth_http.user_path = {authd_url}/rabbitmq/user
auth_http.vhost_path = {authd_url}/rabbitmq/vhost
auth_http.resource_path = {authd_url}/rabbitmq/resource
auth_http.topic_path = {authd_url}/rabbitmq/topic
"""


@dataclass(frozen=True)
class Node:
    """One node: its name, MQTT port and files."""

    name: str
    mqtt_port: int
    dist_port: int
    directory: Path


class Cluster:
    """Two nodes joined into one cluster, with ``authd_url`` as their HTTP auth backend."""

    def __init__(self, directory: Path, authd_url: str, *, auth_cache_ttl_ms: int | None = None) -> None:
        self.directory = directory
        self.authd_url = authd_url
        #: With a TTL, the nodes run ``rabbitmq_auth_backend_cache`` in front of the HTTP backend.
        self.auth_cache_ttl_ms = auth_cache_ttl_ms
        self.home = directory / "home"
        tag = secrets.token_hex(3)
        epmd_port, *ports = free_ports(5)
        self.epmd_port = epmd_port
        self.nodes = [
            Node(f"mqttprov-{letter}-{tag}@localhost", ports[2 * i], ports[2 * i + 1], directory / letter)
            for i, letter in enumerate("ab")
        ]
        self.ctl_script = directory / "rabbitmqctl.sh"
        self._epmd: subprocess.Popen[bytes] | None = None
        self._servers: list[subprocess.Popen[bytes]] = []

    def env(self, node: Node | None = None) -> dict[str, str]:
        """The environment a node (or the CLI, ``node=None``) runs with."""
        env = {
            **os.environ,
            "HOME": str(self.home),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Not /etc/rabbitmq/rabbitmq-env.conf: that one belongs to the system node.
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            # The CLI offers a plugin's commands (list_mqtt_connections) only when it is enabled.
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
        }
        if node is not None:
            files = node.directory
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_CONFIG_FILE": str(files / "rabbitmq"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(files / "advanced.config"),
                "RABBITMQ_MNESIA_BASE": str(files / "mnesia"),
                "RABBITMQ_LOG_BASE": str(files / "log"),
                "RABBITMQ_PID_FILE": str(files / "rabbitmq.pid"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(files / "feature_flags"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(files / "plugins-expand"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        return env

    def _write_files(self) -> None:
        self.home.mkdir(parents=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.directory / "rabbitmq-env.conf").write_text("")
        plugins = ["rabbitmq_mqtt", "rabbitmq_auth_backend_http"]
        if self.auth_cache_ttl_ms is not None:
            plugins.append("rabbitmq_auth_backend_cache")
        (self.directory / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        for node in self.nodes:
            node.directory.mkdir()
            conf = rabbitmq_conf(node.mqtt_port, self.authd_url, self.auth_cache_ttl_ms)
            (node.directory / "rabbitmq.conf").write_text(conf)
        env = self.env()
        private = {key: value for key, value in env.items() if key.startswith(("HOME", "ERL_", "RABBIT"))}
        exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in private.items())
        self.ctl_script.write_text(f'#!/bin/sh\n{exports}exec {RABBITMQCTL} "$@"\n')
        self.ctl_script.chmod(0o755)

    def start(self) -> None:
        """Start epmd and both nodes, then join node b to node a."""
        self._write_files()
        self._epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for node in self.nodes:
            with (node.directory / "stdout.log").open("wb") as out:
                self._servers.append(
                    subprocess.Popen(
                        [str(RABBITMQ_SERVER)],
                        env=self.env(node),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=node.directory,
                    )
                )
        for node in self.nodes:
            self.wait_for_mqtt(node)
        a, b = self.nodes
        for args in (("stop_app",), ("join_cluster", a.name), ("start_app",)):
            self.ctl(b, *args)
        self.wait_for_mqtt(b)

    def ctl(self, node: Node, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS``; its output (fails the test on a non-zero exit)."""
        done = subprocess.run(
            [str(self.ctl_script), "-n", node.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} on {node.name}: {done.stdout}{done.stderr}")
        return done.stdout

    def wait_for_mqtt(self, node: Node) -> None:
        """Until the node's MQTT listener accepts connections (the last thing a node starts)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=1):
                    return
            except OSError:
                for server in self._servers:
                    if server.poll() is not None:
                        log = (node.directory / "stdout.log").read_text(errors="replace")[-2000:]
                        raise AssertionError(
                            f"a RabbitMQ node exited ({server.returncode}):\n{log}"
                        ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{node.name} did not open MQTT port {node.mqtt_port}") from None
                time.sleep(0.2)  # polling a port against the deadline above

    def stop(self) -> None:
        """Stop both nodes and epmd; kill what does not stop."""
        for node, server in zip(self.nodes, self._servers, strict=False):
            if server.poll() is None:
                subprocess.run(
                    [str(self.ctl_script), "-n", node.name, "stop"],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
        for server in self._servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if self._epmd is not None:
            self._epmd.terminate()
            self._epmd.wait(timeout=10)


@contextmanager
def rabbitmq_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """Start ``cluster``; stop it on exit (also when starting failed half-way)."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
