"""Prometheus metrics of a running process: collectors over the services' own counters.

The services (``auth_plugin/``, ``provisioning/``, ``broker/embedded/``) keep plain ints and
:class:`~collections.Counter` objects and import nothing of Prometheus: a login costs an integer
increment, not a labelled metric's lock. Each collector here reads the live objects when a
scraper asks, and each process puts the ones it has in a :class:`CollectorRegistry` of its own
(:func:`process_registry`), beside the library's process, platform and GC collectors. Every metric
is listed in docs/operations/metrics.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from auth_plugin.principals import BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED, SERVER_UNAVAILABLE

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from auth_plugin.authd.kicker import CommandKicker
    from auth_plugin.authd.metrics import Metrics
    from auth_plugin.authenticator import Authenticator
    from auth_plugin.revocation import Revoker
    from broker.embedded.control import BrokerLink
    from broker.external.mosquitto.bridge import DynsecBridge
    from provisioning.passwords import PasswordHasher
    from provisioning.service import ProvisioningService

__all__ = [
    "AuthdCollector",
    "AuthenticatorCollector",
    "BridgeCollector",
    "BrokerCollector",
    "FeedCollector",
    "HasherCollector",
    "ProvisioningCollector",
    "RevokerCollector",
    "process_registry",
    "render",
]

#: CONNACK codes of refused logins, as the ``result`` label of ``mqttprov_logins_total``.
_LOGIN_RESULTS = {
    BAD_USERNAME_OR_PASSWORD: "bad_credentials",
    NOT_AUTHORIZED: "not_authorized",
    SERVER_UNAVAILABLE: "server_unavailable",
}


def process_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of ``collectors`` and the library's process, platform and GC collectors.

    One per process object (never the library's global registry): tests run several servers in
    one interpreter, and each must report its own counters.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The registry's exposition and its content type: OpenMetrics if ``accept`` (the request's
    ``Accept`` header) asks for it, else the Prometheus text format."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _by(name: str, text: str, label: str, counts: Mapping[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=[label])
    for value, count in sorted(dict(counts).items()):
        family.add_metric([value], count)
    return family


class AuthenticatorCollector:
    """Login decisions, how passwords were checked, and the bcrypt budget's queue."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def collect(self) -> Iterable[Metric]:
        """Read the authenticator's counters now."""
        stats = self._authenticator.stats
        budget = self._authenticator.budget
        results = {"accepted": stats.accepted}
        for code, count in dict(stats.refused_by_code).items():
            results[_LOGIN_RESULTS.get(code, f"code_{code}")] = count
        yield _by(
            "mqttprov_logins",
            "Login decisions (MQTT CONNECT or an auth callback): accepted, or refused by CONNACK meaning.",
            "result",
            results,
        )
        yield _by(
            "mqttprov_password_checks",
            "Passwords checked, by how: the in-memory cache, a stored verifier (one HMAC), or bcrypt.",
            "path",
            {"cache": stats.cache_hits, "verifier": stats.verifier_checks, "bcrypt": stats.bcrypt_checks},
        )
        yield GaugeMetricFamily(
            "mqttprov_bcrypt_login_checks_waiting",
            "Login checks waiting for a turn at the bcrypt workers.",
            value=budget.waiting,
        )
        yield SummaryMetricFamily(
            "mqttprov_bcrypt_turn_wait_seconds",
            "Time login checks waited for their turn at the bcrypt workers.",
            count_value=budget.turns_given,
            sum_value=budget.turn_wait_seconds,
        )
        yield _by(
            "mqttprov_bcrypt_login_checks_refused",
            "Login checks not made: the queue was full, or the turn came too late for the deadline.",
            "reason",
            {"full": budget.refused, "late": budget.late},
        )
        yield _counter(
            "mqttprov_login_audits_dropped",
            "Refusal audit events not written: too many writes were in flight.",
            stats.audits_dropped,
        )


class HasherCollector:
    """The bcrypt worker pool: depth, waiting, work done."""

    def __init__(self, hasher: PasswordHasher) -> None:
        self._hasher = hasher

    def collect(self) -> Iterable[Metric]:
        """Read the pool's counters now."""
        hasher = self._hasher
        yield GaugeMetricFamily(
            "mqttprov_bcrypt_queue_depth", "bcrypt operations queued or running.", value=hasher.pending
        )
        yield GaugeMetricFamily("mqttprov_bcrypt_workers", "bcrypt worker threads.", value=hasher.workers)
        yield SummaryMetricFamily(
            "mqttprov_bcrypt_wait_seconds",
            "Time bcrypt operations waited for a worker thread.",
            count_value=hasher.waits,
            sum_value=hasher.wait_seconds,
        )
        yield _counter(
            "mqttprov_bcrypt_operations",
            "bcrypt hashes and checks started (not the credential pool's idle-time hashes).",
            hasher.operations,
        )


class ProvisioningCollector:
    """Provisioning replies by result."""

    def __init__(self, service: ProvisioningService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        """Read the service's counters now."""
        yield _by(
            "mqttprov_provisioning_requests",
            "Provisioning replies by result: ok, pending, or the refusal's error_code.",
            "result",
            self._service.results,
        )


class FeedCollector:
    """How far behind the credential change feed a follower is."""

    def __init__(self, read_at: Callable[[], float], position: Callable[[], int | None]) -> None:
        self._read_at = read_at
        self._position = position

    def collect(self) -> Iterable[Metric]:
        """Read the follower's position now."""
        yield GaugeMetricFamily(
            "mqttprov_change_feed_lag_seconds",
            "Seconds since the change feed was last read and applied (since the start if never).",
            value=max(0.0, time.monotonic() - self._read_at()),
        )
        position = self._position()
        if position is not None:
            yield GaugeMetricFamily(
                "mqttprov_change_feed_position", "Id of the newest change applied.", value=position
            )


class RevokerCollector(FeedCollector):
    """The revocation follower: its feed lag, and the sessions it ended."""

    def __init__(self, revoker: Revoker) -> None:
        super().__init__(lambda: revoker.read_at, lambda: revoker.position)
        self._revoker = revoker

    def collect(self) -> Iterable[Metric]:
        """Read the follower's counters now."""
        yield from super().collect()
        yield _counter(
            "mqttprov_kicks",
            "Sessions ended because their credential was revoked (decommissioned, reissued, removed).",
            self._revoker.kicked,
        )


class BridgeCollector(FeedCollector):
    """``mqttprov bridge run``: its feed lag, and the clients it disabled on Mosquitto."""

    def __init__(self, bridge: DynsecBridge) -> None:
        super().__init__(lambda: bridge.read_at, lambda: bridge.position)
        self._bridge = bridge

    def collect(self) -> Iterable[Metric]:
        """Read the bridge's counters now."""
        yield from super().collect()
        yield _counter(
            "mqttprov_bridge_revocations",
            "Clients disabled or deleted on Mosquitto because their credential was revoked.",
            self._bridge.revoked,
        )


class BrokerCollector:
    """The embedded broker: connections, sessions, and messages dropped over the bounds."""

    def __init__(self, link: BrokerLink) -> None:
        self._link = link

    def collect(self) -> Iterable[Metric]:
        """Read the broker's tables now (nothing before it has started)."""
        broker = self._link.broker
        if broker is None:
            return
        yield GaugeMetricFamily(
            "mqttprov_connections",
            "Open MQTT connections (before and after CONNECT).",
            value=broker.open_connections,
        )
        yield GaugeMetricFamily(
            "mqttprov_sessions",
            "Connected, authenticated MQTT sessions.",
            value=sum(1 for _ in broker.live_principals()),
        )
        yield _counter(
            "mqttprov_connections_over_limit",
            "CONNECTs refused over [broker] max_connections or max_connections_per_address.",
            broker.refused_over_limit,
        )
        yield _counter(
            "mqttprov_sessions_expired",
            "Offline persistent sessions discarded after [broker] session_expiry.",
            broker.sessions_expired,
        )
        drops = dict.fromkeys(("slow_subscriber", "offline_queue_full", "unacknowledged", "incoming"), 0)
        yield _by(
            "mqttprov_deliveries_dropped",
            "Messages dropped over [broker] max_queued_messages, by where.",
            "reason",
            drops | dict(broker.dropped),
        )


class AuthdCollector:
    """The ``mqttprov_authd_*`` families of ``mqttprov authd``, under their historical names."""

    def __init__(self, metrics: Metrics, kicker: CommandKicker | None) -> None:
        self._metrics = metrics
        self._kicker = kicker

    def collect(self) -> Iterable[Metric]:
        """Read authd's counters now."""
        metrics = self._metrics
        stats = metrics.stats
        for name, text, counts in (
            ("logins", "Login decisions by contract and result.", metrics.logins),
            ("checks", "Topic, vhost and resource decisions.", metrics.checks),
        ):
            family = CounterMetricFamily(f"mqttprov_authd_{name}", text, labels=["contract", "result"])
            for (contract, result), count in sorted(dict(counts).items()):
                family.add_metric([contract, result], count)
            yield family
        yield _by(
            "mqttprov_authd_errors",
            "Requests answered 'deny' because deciding failed.",
            "contract",
            metrics.errors,
        )
        for name, text, value in (
            ("unauthorized", "Requests without the shared secret.", metrics.unauthorized),
            ("overloaded", "Requests denied over max_concurrent.", metrics.overloaded),
            ("bcrypt_checks", "Password checks that ran bcrypt.", stats.bcrypt_checks),
            (
                "verifier_checks",
                "Password checks answered by a stored verifier (one HMAC).",
                stats.verifier_checks,
            ),
            ("cache_hits", "Password checks answered by the cache.", stats.cache_hits),
            ("principal_cache_hits", "Topic checks served from cache.", metrics.principal_cache_hits),
        ):
            yield _counter(f"mqttprov_authd_{name}", text, value)
        yield GaugeMetricFamily(
            "mqttprov_authd_cache_hit_ratio",
            "cache hits / all password checks.",
            value=metrics.cache_hit_ratio,
        )
        yield GaugeMetricFamily(
            "mqttprov_authd_bcrypt_queue_depth",
            "bcrypt operations queued or running.",
            value=metrics.hasher.pending,
        )
        latency = HistogramMetricFamily(
            "mqttprov_authd_request_seconds", "Time to answer one request, by contract.", labels=["contract"]
        )
        for contract, histogram in sorted(dict(metrics.latency).items()):
            cumulative, buckets = 0, []
            for bound, count in zip(histogram.bounds, histogram.counts, strict=True):
                cumulative += count
                buckets.append((str(bound), float(cumulative)))
            buckets.append(("+Inf", float(histogram.count)))
            latency.add_metric([contract], buckets, histogram.total)
        yield latency
        if self._kicker is not None:
            yield _by(
                "mqttprov_authd_kick_commands",
                "kick_command runs by result: ok (exit 0) or failed.",
                "result",
                {"ok": self._kicker.kicked, "failed": self._kicker.failed},
            )
