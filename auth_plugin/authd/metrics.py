"""authd's counters and latency histogram: plain numbers, read by :class:`broker.metrics.AuthdCollector`."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from auth_plugin.authenticator import AuthStats
from provisioning.passwords import PasswordHasher

#: Upper bounds (seconds) of the request latency buckets: a cache hit is well under a millisecond,
#: a bcrypt check at cost 12 a few hundred milliseconds, a queued one longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    """Cumulative buckets, sum and count, as Prometheus wants them."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        index = bisect.bisect_left(self.bounds, seconds)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += seconds
        self.count += 1


class Metrics:
    """What authd counts; the contracts and the guard in :mod:`auth_plugin.authd.app` feed it."""

    def __init__(self, stats: AuthStats, hasher: PasswordHasher) -> None:
        self.stats = stats
        self.hasher = hasher
        self.logins: Counter[tuple[str, str]] = Counter()
        self.checks: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.unauthorized = 0
        self.overloaded = 0
        self.principal_cache_hits = 0
        self.latency: dict[str, Histogram] = {}

    def login(self, contract: str, *, accepted: bool) -> None:
        """Count one login decision."""
        self.logins[(contract, "ok" if accepted else "refused")] += 1

    def check(self, contract: str, *, allowed: bool) -> None:
        """Count one topic (or vhost/resource) decision."""
        self.checks[(contract, "allow" if allowed else "deny")] += 1

    def observe(self, contract: str, seconds: float) -> None:
        """Record how long one request took."""
        self.latency.setdefault(contract, Histogram()).observe(seconds)

    @property
    def cache_hit_ratio(self) -> float:
        """Share of password checks answered by the in-memory cache (not a stored verifier or bcrypt)."""
        stats = self.stats
        checks = stats.cache_hits + stats.verifier_checks + stats.bcrypt_checks
        return stats.cache_hits / checks if checks else 0.0
