"""Counters and a latency histogram, rendered in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from auth_plugin.authenticator import AuthStats
from provisioning.passwords import PasswordHasher

#: Upper bounds (seconds) of the request latency buckets: a cache hit is well under a millisecond,
#: a bcrypt check at cost 12 a few hundred milliseconds, a queued one longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    """Cumulative buckets, sum and count, as Prometheus wants them."""

    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += seconds
        self.count += 1


class Metrics:
    """What ``/metrics`` reports; the contracts and the guard in :mod:`auth_plugin.authd.app` feed it."""

    def __init__(self, stats: AuthStats, hasher: PasswordHasher) -> None:
        self._stats = stats
        self._hasher = hasher
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
        stats = self._stats
        checks = stats.cache_hits + stats.verifier_checks + stats.bcrypt_checks
        return stats.cache_hits / checks if checks else 0.0

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        out: list[str] = []

        def family(name: str, kind: str, text: str, samples: Mapping[str, float]) -> None:
            out.extend((f"# HELP mqttprov_authd_{name} {text}", f"# TYPE mqttprov_authd_{name} {kind}"))
            out.extend(f"mqttprov_authd_{name}{labels} {_number(value)}" for labels, value in samples.items())

        def by_result(counts: Counter[tuple[str, str]]) -> dict[str, float]:
            return {f'{{contract="{c}",result="{r}"}}': n for (c, r), n in sorted(counts.items())}

        family("logins_total", "counter", "Login decisions by contract and result.", by_result(self.logins))
        family("checks_total", "counter", "Topic, vhost and resource decisions.", by_result(self.checks))
        errors = {f'{{contract="{c}"}}': n for c, n in sorted(self.errors.items())}
        family("errors_total", "counter", "Requests answered 'deny' because deciding failed.", errors)
        for name, kind, text, value in (
            ("unauthorized_total", "counter", "Requests without the shared secret.", self.unauthorized),
            ("overloaded_total", "counter", "Requests denied over max_concurrent.", self.overloaded),
            ("bcrypt_checks_total", "counter", "Password checks that ran bcrypt.", self._stats.bcrypt_checks),
            (
                "verifier_checks_total",
                "counter",
                "Password checks answered by a stored verifier (one HMAC).",
                self._stats.verifier_checks,
            ),
            ("cache_hits_total", "counter", "Password checks answered by the cache.", self._stats.cache_hits),
            ("cache_hit_ratio", "gauge", "cache hits / all password checks.", self.cache_hit_ratio),
            (
                "principal_cache_hits_total",
                "counter",
                "Topic checks served from cache.",
                self.principal_cache_hits,
            ),
            ("bcrypt_queue_depth", "gauge", "bcrypt operations queued or running.", self._hasher.pending),
        ):
            family(name, kind, text, {"": value})
        latency: dict[str, float] = {}
        for contract, histogram in sorted(self.latency.items()):
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, histogram.counts, strict=True):
                cumulative += count
                latency[f'_bucket{{contract="{contract}",le="{bound}"}}'] = cumulative
            latency[f'_bucket{{contract="{contract}",le="+Inf"}}'] = histogram.count
            latency[f'_sum{{contract="{contract}"}}'] = histogram.total
            latency[f'_count{{contract="{contract}"}}'] = histogram.count
        family("request_seconds", "histogram", "Time to answer one request, by contract.", latency)
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    # Counters stay exact integers; ratios and sums get microsecond precision.
    return str(value) if isinstance(value, int) else f"{value:.6f}"
