"""The one MAC address parser used everywhere (wire contract, CLI, registry).

Accepted notations, any letter case: ``aa:bb:cc:dd:ee:ff``, ``aa-bb-cc-dd-ee-ff``,
``aabb.ccdd.eeff`` (Cisco) and ``aabbccddeeff``. The canonical form is lowercase with colons.

:func:`parse_mac` is about notation only (lookups, client ids); :func:`parse_device_mac` also
refuses what cannot be one device's address: all-zero, broadcast and multicast (I/G bit set).
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
_ALL_ZERO = "00:00:00:00:00:00"
_BROADCAST = "ff:ff:ff:ff:ff:ff"
#: The I/G bit of the first octet: set for group (multicast and broadcast) addresses.
_GROUP_BIT = 0x01


def parse_mac(text: str) -> str:
    """Return the canonical ``aa:bb:cc:dd:ee:ff`` form of ``text`` or raise :class:`InvalidMacError`."""
    if not isinstance(text, str):
        raise InvalidMacError(f"MAC address must be text, not {type(text).__name__}")
    if not any(pattern.fullmatch(text) for pattern in _NOTATIONS):
        raise InvalidMacError(f"not a MAC address: {_shown(text)} (expected e.g. aa:bb:cc:dd:ee:ff)")
    digits = "".join(ch for ch in text if ch not in ":-.").lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def parse_device_mac(text: str) -> str:
    """As :func:`parse_mac`, and refuse addresses no single device can own.

    ``00:00:00:00:00:00`` is the unset placeholder firmware reports before it reads its
    EEPROM, and a group address (the I/G bit, the low bit of the first octet: multicast, and
    broadcast ``ff:ff:ff:ff:ff:ff``) names many stations: enrolling either would let one
    credential stand for a whole batch of devices.
    """
    canonical = parse_mac(text)
    if canonical == _ALL_ZERO:
        raise InvalidMacError(f"{canonical} is the all-zero placeholder, not a device's address")
    if int(canonical[:2], 16) & _GROUP_BIT:
        kind = "the broadcast" if canonical == _BROADCAST else "a multicast (group)"
        raise InvalidMacError(f"{canonical} is {kind} address, not a device's address")
    return canonical


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


_PREFIX_SEPARATORS = re.compile(r"[:.-]")
_PREFIX_DIGITS = re.compile(r"[0-9a-f]{1,12}")


def mac_prefix(text: str) -> str | None:
    """The canonical form of the start of a MAC typed in any notation, for prefix searches
    (``AA-BB-C`` and ``aabb.c`` are ``aa:bb:c``); None when ``text`` cannot begin a MAC."""
    digits = _PREFIX_SEPARATORS.sub("", text.strip()).lower()
    if not _PREFIX_DIGITS.fullmatch(digits):
        return None
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
