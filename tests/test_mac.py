"""The one MAC parser: accepted notations, rejections, and properties over arbitrary input."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from provisioning import InvalidMacError, ProvisioningError, is_mac, parse_device_mac, parse_mac

CANONICAL = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
FORBIDDEN = ("+", "#", "/", "\x00")  # MQTT wildcards, topic separator, NUL


@pytest.mark.parametrize(
    "text",
    [
        "aa:bb:cc:0d:1e:2f",
        "AA:BB:CC:0D:1E:2F",
        "Aa:bB:cC:0d:1E:2f",
        "aa-bb-cc-0d-1e-2f",
        "AA-BB-CC-0D-1E-2F",
        "aabb.cc0d.1e2f",
        "AABB.CC0D.1E2F",
        "aabbcc0d1e2f",
        "AABBCC0D1E2F",
        "AaBbCc0d1E2f",
    ],
)
def test_accepted_notations_give_canonical_form(text: str) -> None:
    assert parse_mac(text) == "aa:bb:cc:0d:1e:2f"
    assert is_mac(text) is True


@pytest.mark.parametrize("text", ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:23:45:67:89:ab"])
def test_canonical_form_is_a_fixed_point(text: str) -> None:
    assert parse_mac(text) == text


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("aa:bb:cc:dd:ee", id="five-octets"),
        pytest.param("aa:bb:cc:dd:ee:ff:00", id="seven-octets"),
        pytest.param("aabbccddeef", id="eleven-digits"),
        pytest.param("aabbccddeeff0", id="thirteen-digits"),
        pytest.param("a:bb:cc:dd:ee:ff", id="short-octet"),
        pytest.param("aabb.ccdd.eef", id="short-cisco-group"),
        pytest.param("gg:bb:cc:dd:ee:ff", id="non-hex"),
        pytest.param("aabbccddeefz", id="non-hex-bare"),
        pytest.param("0x:bb:cc:dd:ee:ff", id="hex-prefix"),
        pytest.param("aa:bb-cc:dd:ee:ff", id="colon-and-dash"),
        pytest.param("aabb.ccdd-eeff", id="dot-and-dash"),
        pytest.param("aa:bbcc:dd:ee:ff", id="partial-separators"),
        pytest.param("aabb:ccdd:eeff", id="cisco-groups-with-colons"),
        pytest.param("aa.bb.cc.dd.ee.ff", id="dots-between-octets"),
        pytest.param("aa::bb:cc:dd:ee:ff", id="doubled-separator"),
        pytest.param("aa:bb:cc:dd:ee:+", id="plus-wildcard"),
        pytest.param("aa:bb:cc:dd:ee:#", id="hash-wildcard"),
        pytest.param("aa/bb/cc/dd/ee/ff", id="slash"),
        pytest.param("aa:bb:cc:dd:ee:ff/x", id="trailing-topic-level"),
        pytest.param("aabbccddeeff\x00", id="nul"),
        pytest.param(" aa:bb:cc:dd:ee:ff", id="leading-space"),
        pytest.param("aa:bb:cc:dd:ee:ff ", id="trailing-space"),
        pytest.param("aa:bb:cc :dd:ee:ff", id="inner-space"),
        pytest.param("aa:bb:cc:dd:ee:ff\t", id="tab"),
        pytest.param("aa:bb:cc:dd:ee:ff\n", id="trailing-newline"),
        pytest.param("aabbccddeeff\r\n", id="crlf"),
        pytest.param("\u0661\u0662:bb:cc:dd:ee:ff", id="arabic-indic-digits"),
        pytest.param("\uff41\uff41:bb:cc:dd:ee:ff", id="fullwidth-letters"),
        pytest.param("\uff10\uff10bbccddeeff", id="fullwidth-digits"),
    ],
)
def test_rejected_text(text: str) -> None:
    with pytest.raises(InvalidMacError):
        parse_mac(text)
    assert is_mac(text) is False


@pytest.mark.parametrize("value", [None, b"aabbccddeeff", 0xAABBCCDDEEFF, ["aa:bb:cc:dd:ee:ff"]])
def test_non_text_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidMacError, match="must be text"):
        parse_mac(value)
    assert is_mac(value) is False


def test_error_is_one_bounded_line() -> None:
    with pytest.raises(InvalidMacError) as info:
        parse_mac("x" * 500 + "\n" + "y")

    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 120
    assert info.value.error_code == "INVALID_MAC"
    assert isinstance(info.value, ProvisioningError)
    assert isinstance(info.value, ValueError)


# -- properties -----------------------------------------------------------------------------------


def render(octets: bytes, notation: int) -> str:
    """``octets`` in one of the four accepted notations, lowercase."""
    digits = octets.hex()
    if notation == 0:
        return ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    if notation == 1:
        return "-".join(digits[i : i + 2] for i in range(0, 12, 2))
    if notation == 2:
        return ".".join(digits[i : i + 4] for i in range(0, 12, 4))
    return digits


@given(
    octets=st.binary(min_size=6, max_size=6),
    notation=st.integers(min_value=0, max_value=3),
    upper=st.lists(st.booleans(), min_size=17, max_size=17),
)
def test_every_notation_and_case_gives_the_same_canonical(
    octets: bytes, notation: int, upper: list[bool]
) -> None:
    rendered = "".join(
        ch.upper() if up else ch for ch, up in zip(render(octets, notation), upper, strict=False)
    )

    assert parse_mac(rendered) == ":".join(f"{b:02x}" for b in octets)


MAC_ALPHABET = "0123456789abcdefABCDEF:-."


@given(
    st.one_of(
        st.text(),
        st.text(alphabet=MAC_ALPHABET, min_size=11, max_size=18),
        st.from_regex(r"[0-9A-Fa-f:.\-]{12,17}", fullmatch=True),
        # Valid MACs too, so that the idempotence branch is exercised.
        st.builds(render, st.binary(min_size=6, max_size=6), st.integers(min_value=0, max_value=3)),
    )
)
@example("aa:bb:cc:dd:ee:ff\n")
@example("AABB.CCDD.EEFF")
def test_arbitrary_text_is_rejected_or_canonical(text: str) -> None:
    try:
        parsed = parse_mac(text)
    except InvalidMacError:
        return
    assert CANONICAL.fullmatch(parsed)
    assert parse_mac(parsed) == parsed


@given(prefix=st.text(), forbidden=st.sampled_from(FORBIDDEN), suffix=st.text())
@example(prefix="aa:bb:cc:dd:ee:f", forbidden="+", suffix="")
@example(prefix="aabbccddeeff", forbidden="\x00", suffix="")
def test_text_with_wildcards_slash_or_nul_never_parses(prefix: str, forbidden: str, suffix: str) -> None:
    assert not is_mac(prefix + forbidden + suffix)


# -- device MACs: what one device can own -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("00:00:00:00:00:00", id="all-zero"),
        pytest.param("000000000000", id="all-zero-bare"),
        pytest.param("ff:ff:ff:ff:ff:ff", id="broadcast"),
        pytest.param("FFFF.FFFF.FFFF", id="broadcast-cisco"),
        pytest.param("01:00:5e:00:00:fb", id="ipv4-multicast"),
        pytest.param("33-33-00-00-00-01", id="ipv6-multicast"),
        pytest.param("01:80:c2:00:00:0e", id="lldp-group"),
        pytest.param("03:00:00:00:00:01", id="local-multicast"),
    ],
)
def test_group_and_all_zero_addresses_are_not_device_macs(text: str) -> None:
    assert is_mac(text) is True  # a MAC by notation: lookups and client ids still parse it
    with pytest.raises(InvalidMacError, match="not a device's address"):
        parse_device_mac(text)


@pytest.mark.parametrize(
    "text", ["02:00:00:00:00:00", "00:00:00:00:00:01", "fe:ff:ff:ff:ff:ff", "a4cf12345678"]
)
def test_unicast_addresses_are_device_macs(text: str) -> None:
    assert parse_device_mac(text) == parse_mac(text)


@given(octets=st.binary(min_size=6, max_size=6), notation=st.integers(min_value=0, max_value=3))
def test_device_mac_is_exactly_a_nonzero_unicast_mac(octets: bytes, notation: int) -> None:
    unicast_and_set = not octets[0] & 0x01 and any(octets)
    try:
        parsed = parse_device_mac(render(octets, notation))
    except InvalidMacError:
        assert not unicast_and_set
    else:
        assert unicast_and_set
        assert parsed == ":".join(f"{b:02x}" for b in octets)
