"""Proof that a provisioning session may enrol: a fleet secret or a per-device derived key.

``device_key`` follows the derived-key scheme of Azure DPS group enrolments: each device is
flashed at the factory with ``base64url(HMAC-SHA256(master secret, canonical MAC))``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from provisioning.mac import parse_mac


def derive_device_key(master_secret: str, mac: str) -> str:
    """The key a device with ``mac`` presents as its provisioning password (unpadded base64url)."""
    digest = hmac.new(master_secret.encode(), parse_mac(mac).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def secrets_match(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret with the expected one."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode())
