"""The one MAC address parser used everywhere (wire contract, CLI, registry).

Accepted notations, any letter case: ``aa:bb:cc:dd:ee:ff``, ``aa-bb-cc-dd-ee-ff``,
``aabb.ccdd.eeff`` (Cisco) and ``aabbccddeeff``. The canonical form is lowercase with colons.
"""

from __future__ import annotations

import re

from provisioning.errors import InvalidMacError

_HEX = "[0-9A-Fa-f]"
# fullmatch with explicit patterns per notation: no mixing of separators, no stray characters.
_NOTATIONS = (
    re.compile(rf"(?:{_HEX}{{2}}:){{5}}{_HEX}{{2}}"),
    re.compile(rf"(?:{_HEX}{{2}}-){{5}}{_HEX}{{2}}"),
    re.compile(rf"(?:{_HEX}{{4}}\.){{2}}{_HEX}{{4}}"),
    re.compile(rf"{_HEX}{{12}}"),
)
_MAX_SHOWN = 40


def parse_mac(text: str) -> str:
    """Return the canonical ``aa:bb:cc:dd:ee:ff`` form of ``text`` or raise :class:`InvalidMacError`."""
    if not isinstance(text, str):
        raise InvalidMacError(f"MAC address must be text, not {type(text).__name__}")
    if not any(pattern.fullmatch(text) for pattern in _NOTATIONS):
        raise InvalidMacError(f"not a MAC address: {_shown(text)} (expected e.g. aa:bb:cc:dd:ee:ff)")
    digits = "".join(ch for ch in text if ch not in ":-.").lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def is_mac(text: str) -> bool:
    """True when :func:`parse_mac` accepts ``text``."""
    try:
        parse_mac(text)
    except InvalidMacError:
        return False
    return True


def _shown(text: str) -> str:
    """A bounded, printable rendering of untrusted input for error messages."""
    shown = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
    return repr(shown)
