"""What every figure gets: sizes (quick or full), a private work directory, a log line printer."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Sizes:
    """How big each figure is; ``QUICK`` runs in CI, ``FULL`` is what the docs report."""

    #: Rounds per side, run interleaved: ours, reference, ours, reference, ...
    rounds: int
    warm_devices: int
    warm_reconnects: int
    cold_logins: int
    auth_db_logins: int
    quiet_seconds: float
    provision_devices: int
    throughput_messages: int
    registry_devices: int
    registry_lookups: int
    memory_connections: int
    storm_concurrency: int = 50
    storm_processes: int = 1
    probe_rate: float = 50.0
    provision_concurrency: int = 50
    throughput_devices: int = 10
    #: bcrypt cost of the logins and provisioning figures.
    bcrypt_cost: int = 10
    #: Devices issued on Mosquitto's dynamic security, and the reconnects of its warm storm.
    mosquitto_devices: int = 1_000
    mosquitto_reconnects: int = 10_000
    #: Devices in the RabbitMQ figure (authd's registry and RabbitMQ's internal users), and reconnects.
    rabbitmq_devices: int = 300
    rabbitmq_reconnects: int = 2_000
    #: Concurrent logins of the RabbitMQ cold storms (both sides): what one bcrypt worker checks
    #: within authd's request_timeout (5 s) at cost 10 here; at 50, a third to a half of the
    #: cold logins were answered "deny" after the timeout.
    rabbitmq_cold_concurrency: int = 20
    #: Load processes of the external-broker storms (the brokers outrun one Python load process).
    external_storm_processes: int = 2
    #: Rounds per side of the external-broker figures (a cluster start is their fixed cost).
    external_rounds: int = 2
    #: Restart storm: devices connected when the broker restarts, restarts, and the bcrypt cost
    #: of their credentials (the default, 12, in the full run). Five restarts: a storm of 200
    #: warm logins lasts well under a second, so one round's pair of rates is noisy.
    restart_devices: int = 2000
    restart_rounds: int = 5
    restart_cost: int = 12
    #: Flood: real devices' first logins (as many again without the flood, the reference), bad
    #: CONNECTs kept in flight, provisioning sessions timed in each phase, the bcrypt cost, and
    #: how long the real devices keep trying.
    flood_devices: int = 20
    flood_concurrency: int = 200
    flood_provisions: int = 10
    flood_cost: int = 12
    flood_seconds: float = 120.0
    #: Enrolment burst: first boots at once, at this cost and at cost 4, and bursts per side.
    enrol_devices: int = 100
    enrol_cost: int = 12
    enrol_rounds: int = 2
    #: Many subscribers: devices connected and subscribed to their namespaces while the throughput
    #: figure's publishers run, and the messages each publisher sends per round (amqtt matches
    #: every publish against every filter: at 10,000 filters it delivers some tens a second).
    many_subscribers: int = 10_000
    many_subscribers_messages: int = 1_000
    #: A round ends this many seconds after it began even when not every message came through.
    many_subscribers_seconds: float = 20.0
    #: Subscribe storm: retained messages stored, and maximal SUBSCRIBEs sent back to back.
    storm_retained: int = 10_000
    storm_subscribes: int = 20
    #: Rounds per side of those two figures (each holds a broker full of subscribers or retained).
    subscription_rounds: int = 2
    #: API pages: requests of each kind of page (over HTTP, and as many read in-process).
    api_page_requests: int = 500
    #: HTTP against MQTT provisioning: rounds per transport (``provision_devices`` each).
    http_provision_rounds: int = 2

    def as_json(self) -> dict[str, float]:
        """The sizes as plain data."""
        return {key: float(value) for key, value in asdict(self).items()}


QUICK = Sizes(
    rounds=2,
    warm_devices=100,
    warm_reconnects=500,
    cold_logins=40,
    auth_db_logins=30,
    quiet_seconds=1.0,
    provision_devices=30,
    throughput_messages=500,
    registry_devices=5_000,
    registry_lookups=200,
    memory_connections=200,
    mosquitto_devices=300,
    mosquitto_reconnects=3_000,
    rabbitmq_devices=30,
    rabbitmq_reconnects=300,
    external_rounds=1,
    restart_devices=30,
    restart_rounds=1,
    restart_cost=8,
    flood_devices=6,
    flood_concurrency=60,
    flood_provisions=3,
    flood_cost=8,
    flood_seconds=15.0,
    enrol_devices=20,
    enrol_cost=8,
    enrol_rounds=1,
    many_subscribers=200,
    many_subscribers_messages=100,
    many_subscribers_seconds=5.0,
    storm_retained=1_000,
    storm_subscribes=5,
    subscription_rounds=1,
    api_page_requests=25,
    http_provision_rounds=1,
)

FULL = Sizes(
    rounds=2,
    warm_devices=1_000,
    warm_reconnects=3_000,
    cold_logins=300,
    auth_db_logins=200,
    quiet_seconds=4.0,
    provision_devices=300,
    throughput_messages=5_000,
    registry_devices=100_000,
    registry_lookups=1_000,
    memory_connections=2_000,
)


@dataclass(frozen=True)
class Context:
    """Shared by the figures of one run."""

    sizes: Sizes
    quick: bool
    workdir: Path
    log: Callable[[str], None]
    postgres_url: str = os.environ.get("MQTTPROV_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
