"""Turn :class:`config.Settings` into amqtt's broker configuration and our plugins' services.

Plugins are listed in :func:`plugin_config`; adding one is a line there.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auth_plugin.authenticator import Authenticator
from auth_plugin.presence import PresenceRecorder
from auth_plugin.revocation import Revoker
from broker.embedded.subscriptions import TopicLimits
from broker.errors import ServeError
from config import BrokerSettings, Settings
from provisioning.ports import SessionControl
from provisioning.service import ProvisioningService


@dataclass(frozen=True)
class Listener:
    """One socket the broker listens on."""

    name: str
    scheme: str  # mqtt, mqtts or ws
    host: str
    port: int  # 0: any free port, read back once bound
    #: The ``[broker]`` key that sets the port.
    setting: str

    @property
    def bind(self) -> str:
        """amqtt's ``host:port`` notation (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Services:
    """The plain service objects the amqtt plugins adapt."""

    authenticator: Authenticator
    provisioning: ProvisioningService
    sessions: SessionControl
    presence: PresenceRecorder
    revoker: Revoker


def listeners(settings: BrokerSettings) -> list[Listener]:
    """The listeners the settings ask for; the plain TCP one is always first."""
    found = [Listener("default", "mqtt", settings.host, settings.port, "port")]
    if settings.tls_port is not None:
        found.append(Listener("tls", "mqtts", settings.host, settings.tls_port, "tls_port"))
    if settings.ws_port is not None:
        found.append(Listener("ws", "ws", settings.host, settings.ws_port, "ws_port"))
    return found


def topic_limits(settings: BrokerSettings) -> TopicLimits:
    """The ``[broker]`` bounds on topics and subscriptions."""
    return TopicLimits.of(settings)


def plugin_config(services: Services) -> dict[str, dict[str, Any]]:
    """amqtt plugins by dotted path, each with the service it adapts."""
    return {
        "broker.embedded.plugins.auth.MqttprovAuthPlugin": {"authenticator": services.authenticator},
        "broker.embedded.plugins.auth.MqttprovTopicPlugin": {},
        "broker.embedded.plugins.provisioning.ProvisioningPlugin": {
            "service": services.provisioning,
            "sessions": services.sessions,
        },
    }


def check_tls_files(settings: BrokerSettings) -> None:
    """Fail with one line if the TLS certificate or key cannot be loaded."""
    if settings.tls_port is None or settings.tls_cert is None or settings.tls_key is None:
        return
    for key, path in (("broker.tls_cert", settings.tls_cert), ("broker.tls_key", settings.tls_key)):
        if not Path(path).is_file():
            raise ServeError(f"{key}: {path}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ServeError(f"broker.tls_cert/tls_key: cannot load certificate and key: {exc}") from exc


def amqtt_config(settings: Settings, services: Services) -> dict[str, Any]:
    """The configuration dictionary handed to :class:`amqtt.broker.Broker`."""
    check_tls_files(settings.broker)
    listener_configs: dict[str, dict[str, Any]] = {}
    for listener in listeners(settings.broker):
        entry: dict[str, Any] = {"bind": listener.bind, "type": "ws" if listener.scheme == "ws" else "tcp"}
        if listener.scheme == "mqtts":
            entry |= {
                "ssl": True,
                "certfile": str(settings.broker.tls_cert),
                "keyfile": str(settings.broker.tls_key),
            }
        listener_configs[listener.name] = entry
    return {"listeners": listener_configs, "plugins": plugin_config(services)}
