"""Failed-login throttling that slows attackers without locking out honest devices.

- Failures are counted per username, per address and per (username, address) in a window.
- Past ``throttle_after`` failures on any of them, *refusals* are answered more slowly
  (exponential, capped). A correct password is never delayed or refused for this.
- Past ``lockout_after`` failures of one username from one address, that pair is refused
  without a check for ``lockout_seconds``. The same username from another address (the real
  device behind another NAT) is not locked.
- Checks in flight count: while a pair's failures and its checks still running reach
  ``lockout_after``, its further attempts are refused without a check (a burst of concurrent
  guesses gets ``lockout_after`` checks, not one per CONNECT), the correct password included.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from config import AuthSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThrottlePolicy:
    """Thresholds, from ``[auth]``."""

    throttle_after: int = 5
    lockout_after: int = 10
    window: float = 60.0
    lockout_seconds: float = 60.0
    max_delay: float = 2.0

    @classmethod
    def of(cls, auth: AuthSettings) -> ThrottlePolicy:
        """The thresholds ``[auth]`` sets."""
        return cls(
            throttle_after=auth.throttle_after,
            lockout_after=auth.lockout_after,
            window=auth.throttle_window,
            lockout_seconds=auth.lockout_seconds,
            max_delay=auth.max_refusal_delay,
        )


class LoginThrottle:
    """Counts failures and tells how to answer the next attempt."""

    def __init__(
        self,
        policy: ThrottlePolicy,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # In locking order, which is expiry order (one lockout_seconds for all): oldest first.
        self._locked_until: OrderedDict[str, float] = OrderedDict()
        # Checks running per pair; an entry lives only while one runs (bounded by connections).
        self._in_flight: dict[str, int] = {}

    def locked(self, username: str, address: str | None) -> bool:
        """True when this username is locked out from this address right now."""
        key = _pair(username, address)
        until = self._locked_until.get(key)
        if until is None:
            return False
        if self._clock() >= until:
            del self._locked_until[key]
            return False
        return True

    def begin_check(self, username: str, address: str | None) -> bool:
        """Count a check of this pair as in flight; False (and nothing counted) when the pair's
        failures and checks in flight already reach ``lockout_after``. Pair with :meth:`end_check`."""
        if address is None:
            return True  # no pair without an address (see :meth:`failed`)
        key = _pair(username, address)
        running = self._in_flight.get(key, 0)
        stamps = self._failures.get(key)
        horizon = self._clock() - self.policy.window
        failures = sum(1 for stamp in stamps if stamp >= horizon) if stamps else 0
        if failures + running >= self.policy.lockout_after:
            return False
        self._in_flight[key] = running + 1
        return True

    def end_check(self, username: str, address: str | None) -> None:
        """The check counted by :meth:`begin_check` is over (record its result separately)."""
        if address is None:
            return
        key = _pair(username, address)
        running = self._in_flight.pop(key, 0) - 1
        if running > 0:
            self._in_flight[key] = running

    def failed(self, username: str, address: str | None) -> float:
        """Record a failure; return how long to hold the refusal back (seconds)."""
        now = self._clock()
        if address is None:
            # An HTTP auth callback without the client's address (RabbitMQ's): no pair to lock, or
            # anyone who knows a username could lock its owner out everywhere. Refusals still slow down.
            counts = [self._count(f"u:{username}", now)]
            pair_count = 0
        else:
            keys = (f"u:{username}", f"a:{address}", _pair(username, address))
            counts = [self._count(key, now) for key in keys]
            pair_count = counts[2]
        if pair_count >= self.policy.lockout_after and _pair(username, address) not in self._locked_until:
            self._lock(_pair(username, address), now)
            logger.warning(
                "login lockout username=%r address=%s for %.0fs after %d failures",
                username,
                address,
                self.policy.lockout_seconds,
                pair_count,
            )
        worst = max(counts)
        over = worst - self.policy.throttle_after
        if over <= 0:
            return 0.0
        if over == 1:
            # Once per burst: the first failure past the threshold.
            logger.warning("login failures username=%r address=%s: throttling refusals", username, address)
        # 2 ** 10 * 50 ms is past any max_delay allowed (30 s); a bigger power overflows a float.
        return float(min(self.policy.max_delay, 0.05 * 2 ** min(over - 1, 10)))

    def succeeded(self, username: str, address: str | None) -> None:
        """A correct login clears the pair's record (the per-address record stays)."""
        self._failures.pop(_pair(username, address), None)
        self._failures.pop(f"u:{username}", None)

    def _lock(self, key: str, now: float) -> None:
        # Expired lockouts are otherwise only dropped when their own pair tries again: prune them
        # here, and cap the rest like the failure records, so a spray of usernames stays bounded.
        locks = self._locked_until
        while locks and next(iter(locks.values())) <= now:
            locks.popitem(last=False)
        locks[key] = now + self.policy.lockout_seconds
        while len(locks) > self.max_keys:
            locks.popitem(last=False)

    def _count(self, key: str, now: float) -> int:
        stamps = self._failures.pop(key, None) or deque()
        horizon = now - self.policy.window
        while stamps and stamps[0] < horizon:
            stamps.popleft()
        stamps.append(now)
        self._failures[key] = stamps
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        return len(stamps)


def _pair(username: str, address: str | None) -> str:
    return f"p:{username}\x00{address}"
