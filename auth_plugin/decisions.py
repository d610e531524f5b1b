"""What a CONNECT presents, what the authenticator answers, and the counters it keeps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from auth_plugin.principals import BAD_USERNAME_OR_PASSWORD, NOT_AUTHORIZED, SERVER_UNAVAILABLE, Principal

__all__ = ["AuthStats", "Check", "ConnectAttempt", "Decision", "unchecked"]


@dataclass(frozen=True)
class ConnectAttempt:
    """What a CONNECT presented."""

    client_id: str | None
    username: str | None
    password: str | None
    will_flag: bool = False
    address: str | None = None
    will_topic: str | None = None


@dataclass(frozen=True)
class Decision:
    """The principal to bind on success, or why not (for the log; never sent to the client)."""

    principal: Principal | None
    reason: str
    #: CONNACK code for a refusal: 4 wrong credentials, 3 overloaded, 5 everything else.
    code: int = NOT_AUTHORIZED

    @property
    def accepted(self) -> bool:
        """True when the CONNECT may proceed."""
        return self.principal is not None


class Check(enum.Enum):
    """The outcome of checking a password against a stored credential."""

    VERIFIED = enum.auto()
    WRONG = enum.auto()
    #: Not checked: the bcrypt budget had no room (retryable).
    BUSY = enum.auto()
    #: Not checked: the pair's failures and checks in flight reached the lockout.
    LOCKED = enum.auto()


def unchecked(check: Check) -> Decision:
    """The refusal for a password that did not pass: wrong, or not checked (and why)."""
    if check is Check.WRONG:
        return Decision(None, "wrong password", BAD_USERNAME_OR_PASSWORD)
    if check is Check.LOCKED:
        return Decision(None, "too many failures and checks in flight from this address", SERVER_UNAVAILABLE)
    return Decision(None, "bcrypt workers overloaded", SERVER_UNAVAILABLE)


@dataclass
class AuthStats:
    """Counters for operators, tests and the benchmark."""

    #: bcrypt checks of registered credentials (not the equal-cost checks of unknown usernames).
    bcrypt_checks: int = 0
    #: Logins answered by a stored verifier (one HMAC, no bcrypt).
    verifier_checks: int = 0
    cache_hits: int = 0
    overload_refusals: int = 0
    #: Login decisions: accepted, and refused by CONNACK code (3, 4 or 5).
    accepted: int = 0
    refused_by_code: dict[int, int] = field(default_factory=dict)
    #: ``login_refused`` events not written: too many writes were in flight (a flood).
    audits_dropped: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
