"""Pydantic models of every configuration section; unknown keys are errors everywhere."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Port = Annotated[int, Field(ge=1, le=65535)]
#: A port to listen on: 0 asks the OS for any free port at start (the tests' way to avoid races);
#: the running server then reports, and tells devices, the port it actually bound.
ListenPort = Annotated[int, Field(ge=0, le=65535)]

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})  # noqa: S104 - these are the values we detect


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Section):
    """``[broker]``: listeners of the embedded broker and what devices are told to connect to."""

    host: str = "0.0.0.0"  # noqa: S104 - a broker listens on every interface unless told otherwise
    port: ListenPort = 1883
    advertised_host: str | None = None
    advertised_port: Port | None = None
    tls_port: ListenPort | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ws_port: ListenPort | None = None
    #: Seconds a new connection may take to send its CONNECT before it is closed.
    connect_timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    #: Connections at once, in all and from one source address (a gateway or a load test
    #: from one host needs many); over the limit a CONNECT gets CONNACK 3 (server unavailable).
    max_connections: Annotated[int, Field(ge=1)] = 100_000
    max_connections_per_address: Annotated[int, Field(ge=1)] = 2_000
    #: Messages queued for one subscriber before further ones are dropped for it.
    max_queued_messages: Annotated[int, Field(ge=1)] = 1_000
    #: Largest MQTT packet accepted (remaining length, bytes); a larger one closes the connection.
    max_packet_bytes: Annotated[int, Field(ge=1024, le=268_435_455)] = 1_048_576
    #: Topic filters one SUBSCRIBE may carry; the ones past it are refused (SUBACK 0x80).
    max_filters_per_subscribe: Annotated[int, Field(ge=1, le=65_535)] = 32
    #: Subscriptions one session may hold; a new filter past it is refused (SUBACK 0x80).
    max_subscriptions_per_session: Annotated[int, Field(ge=1)] = 100
    #: Longest topic or filter (characters) and deepest (levels): a SUBSCRIBE past either is
    #: refused (SUBACK 0x80), a PUBLISH closes the connection, a will refuses the CONNECT (5).
    max_topic_length: Annotated[int, Field(ge=16, le=65_535)] = 1_024
    max_topic_levels: Annotated[int, Field(ge=2, le=1_000)] = 32
    #: Seconds an offline persistent session (clean session off) and its queued messages are kept
    #: after its connection ended; then it is discarded (MQTT 3.1.1 sets no limit, Mosquitto's
    #: ``persistent_client_expiration``); no "never": every session the broker keeps is bounded.
    session_expiry: Annotated[float, Field(gt=0, le=365 * 86_400)] = 7 * 86_400.0
    #: The event loop of ``serve`` and ``authd``: ``auto`` is uvloop when it is installed, else
    #: asyncio's own (docs/benchmarks.md, figure ``uvloop``).
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @model_validator(mode="after")
    def _tls_needs_cert_and_key(self) -> BrokerSettings:
        if self.tls_port is not None and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("tls_port needs both tls_cert and tls_key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def host_is_wildcard(self) -> bool:
        """True when ``host`` listens on every interface (no address a device could dial)."""
        if self.host in _WILDCARD_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            return False

    @property
    def effective_advertised_host(self) -> str:
        """The host name devices are told to connect to."""
        return self.advertised_host or self.host

    @property
    def effective_advertised_port(self) -> int:
        """The port devices are told to connect to (with ``port = 0``, 0 until a broker has bound one)."""
        return self.advertised_port or self.port


class DatabaseSettings(_Section):
    """``[database]``: where the device registry lives."""

    url: str = "sqlite+aiosqlite:///mqttprov.db"
    pool_size: Annotated[int, Field(ge=1, le=100)] = 5

    @model_validator(mode="after")
    def _supported_driver(self) -> DatabaseSettings:
        if not self.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "url must start with sqlite+aiosqlite:// or postgresql+asyncpg:// (async drivers only)"
            )
        return self


class AuthSettings(_Section):
    """``[auth]``: how device and account passwords are hashed and checked."""

    bcrypt_cost: Annotated[int, Field(ge=4, le=15)] = 12
    #: bcrypt worker threads; default: one less than the CPU count (at least one).
    bcrypt_workers: Annotated[int, Field(ge=1, le=64)] | None = None
    #: Failed logins (per username, per address) within ``throttle_window`` before refusals slow down.
    throttle_after: Annotated[int, Field(ge=1)] = 5
    #: Failed logins for one username from one address before that pair is locked out for a while.
    lockout_after: Annotated[int, Field(ge=1)] = 10
    throttle_window: Annotated[float, Field(gt=0)] = 60.0
    lockout_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_refusal_delay: Annotated[float, Field(ge=0, le=30)] = 2.0
    #: How often each broker polls the credential change feed (PostgreSQL also wakes it by NOTIFY).
    revocation_poll_interval: Annotated[float, Field(gt=0, le=2)] = 0.5
    #: Keep a keyed verifier (HMAC-SHA256) of every credential that passed a bcrypt check in the
    #: registry: later logins of it, after a restart and in every process, cost an HMAC, not bcrypt.
    verifiers: bool = True
    #: The verifier key (at least 32 characters). Every process sharing a registry must use the
    #: same one; unset, it is read from (or created in) ``verifier_key_file``.
    verifier_key: SecretStr | None = None
    #: Where the verifier key is kept when ``verifier_key`` is unset: created with mode 0600 on
    #: first start. Default: ``mqttprov-verifier.key`` beside an SQLite database file, else in the
    #: working directory.
    verifier_key_file: Path | None = None

    @field_validator("verifier_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("verifier_key must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value


class ProvisioningSettings(_Section):
    """``[provisioning]``: who may enrol, with what proof, and how fast."""

    mode: Literal["open", "allowlist", "approval"] = "open"
    auth: Literal["none", "fleet_secret", "device_key"] = "none"
    fleet_secret: SecretStr | None = None
    device_key_secret: SecretStr | None = None
    reprovision: Literal["reject", "reissue"] = "reject"
    max_payload_bytes: Annotated[int, Field(ge=64, le=65536)] = 4096
    pending_retry_after: Annotated[int, Field(ge=1, le=86400)] = 30
    # A device that asks again within this many seconds of its last issue is told to wait:
    # concurrent requests for one MAC then yield exactly one valid password.
    reissue_cooldown: Annotated[float, Field(ge=0, le=3600)] = 5.0
    mac_requests_per_minute: Annotated[int, Field(ge=1)] = 6
    mac_burst: Annotated[int, Field(ge=1)] = 3
    address_requests_per_minute: Annotated[int, Field(ge=1)] = 1000
    address_burst: Annotated[int, Field(ge=1)] = 100
    max_concurrent: Annotated[int, Field(ge=1, le=10000)] = 256
    #: Pre-generated credentials (password and bcrypt hash) kept in memory only, filled from idle
    #: bcrypt time, so that an enrolment burst does not wait for one hash per request; 0: off.
    credential_pool_size: Annotated[int, Field(ge=0, le=10000)] = 128

    @model_validator(mode="after")
    def _proof_needs_its_secret(self) -> ProvisioningSettings:
        if self.auth == "fleet_secret" and not _secret(self.fleet_secret):
            raise ValueError("auth = 'fleet_secret' needs fleet_secret")
        if self.auth == "device_key" and not _secret(self.device_key_secret):
            raise ValueError("auth = 'device_key' needs device_key_secret")
        return self


def _secret(value: SecretStr | None) -> bool:
    return value is not None and bool(value.get_secret_value())


class ExternalSettings(_Section):
    """``[external]``: a production broker mqttprov provisions devices on (and keeps in step: Mosquitto)."""

    #: Where the broker checks device passwords, hence where ``mqttprov worker`` puts a new one:
    #: ``mosquitto`` (dynamic security: handed over through the bridge, needs ``admin_password``)
    #: or ``registry`` (the broker asks ``mqttprov authd``: nothing to hand over, no admin login).
    credentials: Literal["mosquitto", "registry"] = "mosquitto"
    #: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS); the worker and the bridge connect here.
    broker: str = "mqtt://127.0.0.1:1883"
    #: The dynamic-security administrator the bridge logs in as (``mqttprov bridge``).
    admin_username: str = "mqttprov-admin"
    admin_password: SecretStr | None = None
    #: The service client the provisioning worker logs in as (``mqttprov worker``).
    worker_username: str = "mqttprov-worker"
    worker_password: SecretStr | None = None
    #: CA bundle that signs the broker's certificate (``mqtts://``); unset: the system's.
    ca_file: Path | None = None
    #: Workers share ``provision/request`` as ``$share/<group>/provision/request``; empty: plain
    #: (required on RabbitMQ 3.10, which has no shared subscriptions).
    shared_group: str = "mqttprov"
    #: Seconds one command to the broker (dynamic-security call, reply PUBACK) may take.
    request_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    #: What the bridge does to a revoked device or account: ``delete`` or ``disable`` its client.
    on_revoke: Literal["delete", "disable"] = "delete"

    @field_validator("broker")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("mqtt", "mqtts") or not rest.rpartition("@")[2].strip("/"):
            raise ValueError("broker must look like mqtt://host:port or mqtts://host:port")
        return value

    @field_validator("shared_group")
    @classmethod
    def _group_name(cls, value: str) -> str:
        if any(ch in value for ch in "/+#"):
            raise ValueError("shared_group must not contain '/', '+' or '#'")
        return value


class AclSettings(_Section):
    """``[acl]``: what a logged-in device may touch."""

    #: The one topic filter a device may publish, subscribe and receive within.
    #: Placeholders: {device_id}, {username}, {mac}.
    device_template: str = "devices/{device_id}/#"

    @field_validator("device_template")
    @classmethod
    def _per_device(cls, value: str) -> str:
        if not any(p in value for p in ("{device_id}", "{username}", "{mac}")):
            raise ValueError("device_template must contain {device_id}, {username} or {mac}")
        if not value.endswith("/#") or "+" in value or value.count("#") != 1:
            # Devices are told a topic prefix: the template is that prefix followed by '#'.
            raise ValueError("device_template must be a topic prefix ending in '/#', without '+'")
        try:
            sample = value.format(device_id="0" * 32, username="device_0", mac="00:00:00:00:00:00")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"device_template has an unknown placeholder: {exc}") from exc
        if sample.startswith(("$", "provision/", "mqttprov/", "#", "+")):
            raise ValueError(
                "device_template must not reach $-topics, provision/, mqttprov/ or wildcards at the root"
            )
        return value


AuthdContract = Literal["rabbitmq", "emqx", "vernemq", "goauth"]


class AuthdSettings(_Section):
    """``[authd]``: the HTTP auth service production brokers (RabbitMQ, EMQX, VerneMQ, Mosquitto) call."""

    host: str = "127.0.0.1"
    port: ListenPort = 8089
    #: Brokers present it as ``Authorization: Bearer SECRET`` or as the password of HTTP basic auth
    #: (``http://authd:SECRET@host:port/...``); unset, any caller that reaches the port is served.
    shared_secret: SecretStr | None = None
    #: Requests worked on at once; more are answered with the contract's "deny" at once.
    max_concurrent: Annotated[int, Field(ge=1, le=10000)] = 256
    #: Seconds one decision may take (database, bcrypt queue) before it is answered "deny".
    request_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    contracts: tuple[AuthdContract, ...] = ("rabbitmq", "emqx", "vernemq", "goauth")
    #: The RabbitMQ virtual host MQTT connections use (``mqtt.vhost``); others are refused.
    rabbitmq_vhost: str = "/"
    #: A command run when a credential is revoked, to close the user's live connections on a broker
    #: whose HTTP auth cannot do it (RabbitMQ: ``deploy/rabbitmq-kick``, a ``rabbitmqctl eval`` over
    #: the MQTT plugin's connections; ``close_all_user_connections`` leaves MQTT connections open).
    #: Placeholders: ``{username}``. Empty: no kicking (the next login is refused all the same).
    kick_command: tuple[str, ...] = ()
    kick_timeout: Annotated[float, Field(gt=0, le=300)] = 15.0
    #: HTTPS: PEM certificate chain and key. With ``tls_client_ca`` too, brokers must present a
    #: client certificate signed by that CA (mutual TLS), with or without the shared secret.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @field_validator("contracts")
    @classmethod
    def _some_contract(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("enable at least one contract")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _tls_files(self) -> AuthdSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self


class ApiSettings(_Section):
    """``[api]``: the HTTP management API (``mqttprov api``, or inside ``mqttprov serve``)."""

    #: Whether ``mqttprov serve`` hosts the API beside the broker (``mqttprov api`` always does).
    enabled: bool = True
    #: Loopback by default: the API manages every device; expose it deliberately, with TLS.
    host: str = "127.0.0.1"
    #: Not 8080 (http-alt: proxies, Jenkins, dev servers): a taken port stops ``serve``.
    port: ListenPort = 9883
    #: HTTPS: PEM certificate chain and key.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Largest request body accepted (bytes); a larger one is answered 413 before it is read.
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1_048_576)] = 1_048_576
    #: HTTP connections (and requests in progress) at once; past it a request is answered 503.
    #: The API shares ``serve``'s process, and so its file descriptors, with the MQTT listeners:
    #: one client opening connections without end must not starve the devices.
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 1_000
    #: The operator console in the browser, under ``/`` beside the API (docs/console.md).
    console: bool = True
    #: Event streams (``GET /api/v1/events/stream``) open at once, in all and per API token.
    max_streams: Annotated[int, Field(ge=1, le=10_000)] = 32
    max_streams_per_token: Annotated[int, Field(ge=1, le=10_000)] = 4
    #: An event stream ends after this long (the client resumes it with Last-Event-ID), so a
    #: stream never outlives a revoked token or a setting by more than this.
    stream_seconds: Annotated[float, Field(gt=0, le=86_400)] = 900.0
    #: ``GET /metrics`` (Prometheus): ``open`` to anyone who reaches the port, like ``/health``
    #: (the metrics name no device, address or secret); ``token`` with a ``read``-scope API token
    #: only; ``off`` not at all (docs/operations/metrics.md).
    metrics: Literal["open", "token", "off"] = "open"

    @model_validator(mode="after")
    def _tls_files(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


class MetricsSettings(_Section):
    """``[metrics]``: a Prometheus ``/metrics`` listener for ``mqttprov worker``, ``bridge run``,
    and ``serve`` with the API turned off.

    ``serve`` answers ``/metrics`` on its API's port, ``authd`` and ``mqttprov api`` on their own.
    """

    #: Loopback by default; a scraper elsewhere needs the address it reaches.
    host: str = "127.0.0.1"
    #: None (the default): no listener; 0: any free port (logged at start).
    port: ListenPort | None = None


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class LogSettings(_Section):
    """``[log]``: what the long-running commands (``serve``, ``authd``, ``worker``, ...) log on stderr."""

    #: The least severe of mqttprov's own lines to write; libraries write the same but never
    #: below WARNING (amqtt logs every connection at INFO). ``--debug`` wins: DEBUG, for all.
    level: LogLevel = "INFO"
    #: ``text``: one line per record for people; ``json``: one JSON object per line for a log
    #: pipeline, with the keys the README's "Logs" section lists.
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        # MQTTPROV_LOG__LEVEL=debug reads as naturally as DEBUG.
        return value.upper() if isinstance(value, str) else value


class Settings(_Section):
    """The whole effective configuration."""

    broker: BrokerSettings = BrokerSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    provisioning: ProvisioningSettings = ProvisioningSettings()
    external: ExternalSettings = ExternalSettings()
    acl: AclSettings = AclSettings()
    authd: AuthdSettings = AuthdSettings()
    api: ApiSettings = ApiSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()

    def warnings(self) -> list[str]:
        """Operator-facing warnings about settings that work but are probably not meant."""
        found: list[str] = []
        if self.broker.advertised_host is None and self.broker.host_is_wildcard:
            found.append(
                f"broker.host is the wildcard {self.broker.host!r} and broker.advertised_host is not set: "
                "devices will be told to connect to an address they cannot dial"
            )
        if self.provisioning.mode == "open":
            found.append("provisioning.mode is 'open': any device that can reach the broker gets credentials")
        if self.provisioning.auth == "none":
            found.append(
                "provisioning.auth is 'none': anyone who knows a MAC address can enrol it "
                "(use fleet_secret or device_key in production)"
            )
        return found
