"""Topic filters: validation, matching and coverage (what the ACL is built on)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auth_plugin.cache import VerifiedCache
from auth_plugin.principals import AccountPrincipal
from provisioning.topics import InvalidTopicError, covers, matches, parse_rule, validate_filter


@pytest.mark.parametrize(
    ("topic", "topic_filter", "expected"),
    [
        ("devices/a/t", "devices/a/t", True),
        ("devices/a/t", "devices/+/t", True),
        ("devices/a/t", "devices/#", True),
        ("devices", "devices/#", True),  # '#' includes the parent level
        ("devices/a/t/x", "devices/+/t", False),
        ("devices/a", "devices/+/t", False),
        ("other/a/t", "devices/#", False),
        ("$SYS/broker", "#", False),  # [MQTT-4.7.2-1]
        ("$SYS/broker", "+/broker", False),
        ("$SYS/broker", "$SYS/#", True),
    ],
)
def test_matches(topic: str, topic_filter: str, expected: bool) -> None:
    assert matches(topic, topic_filter) is expected


@pytest.mark.parametrize(
    ("rule", "requested", "expected"),
    [
        ("devices/+/telemetry", "devices/+/telemetry", True),
        ("devices/+/telemetry", "devices/abc/telemetry", True),
        ("devices/+/telemetry", "devices/#", False),
        ("devices/+/telemetry", "#", False),
        ("devices/abc/#", "devices/abc/x/+", True),
        ("devices/abc/#", "devices/+/x", False),
        ("devices/abc/#", "devices/abc", True),
        ("#", "anything/at/all", True),
        ("#", "$SYS/#", False),
        ("devices/abc/t", "devices/abc/t/#", False),
    ],
)
def test_covers(rule: str, requested: str, expected: bool) -> None:
    assert covers(rule, requested) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "x\x00y", "a" * 257])
def test_invalid_filters_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTopicError):
        validate_filter(bad)


def test_parse_rule() -> None:
    rule = parse_rule("subscribe devices/+/telemetry")
    assert (rule.action, rule.filter, str(rule)) == (
        "subscribe",
        "devices/+/telemetry",
        "subscribe devices/+/telemetry",
    )
    for bad in ("read devices/#", "subscribe", "publish a/#/b"):
        with pytest.raises(InvalidTopicError):
            parse_rule(bad)


levels = st.sampled_from(["a", "b", "c"])
filter_levels = st.sampled_from(["a", "b", "c", "+"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    parts = draw(st.lists(filter_levels, min_size=1, max_size=4))
    if draw(st.booleans()):
        parts.append("#")
    return "/".join(parts)


@settings(max_examples=300, deadline=None)
@given(rule=filters(), requested=filters(), topic=st.lists(levels, min_size=1, max_size=6).map("/".join))
def test_coverage_is_sound(rule: str, requested: str, topic: str) -> None:
    # If the rule covers the request, no topic the request matches escapes the rule.
    if covers(rule, requested) and matches(topic, requested):
        assert matches(topic, rule)


def test_cache_binds_entries_to_the_credential_tag() -> None:
    cache = VerifiedCache(max_entries=2)
    cache.remember("device_a", "tag1", "pw")
    assert cache.verified("device_a", "tag1", "pw") is True
    assert cache.verified("device_a", "tag1", "other") is False
    assert cache.verified("device_a", "tag2", "pw") is False  # the stored hash changed
    cache.drop("device_a")
    assert cache.verified("device_a", "tag1", "pw") is False


def test_cache_is_bounded_and_holds_no_plaintext() -> None:
    cache = VerifiedCache(max_entries=2)
    for name in ("u1", "u2", "u3"):
        cache.remember(name, "t", f"secret-{name}")
    assert len(cache) == 2
    assert cache.verified("u1", "t", "secret-u1") is False  # evicted, least recently used
    assert all(b"secret" not in entry.digest for entry in cache._entries.values())
    assert "secret" not in repr(list(cache._entries.values()))


def test_cache_answers_with_the_principal_only_for_the_same_password_and_credential() -> None:
    cache = VerifiedCache()
    principal = AccountPrincipal("backend", ("devices/+/telemetry",), (), "tag1")
    cache.remember("backend", "tag1", "pw")
    assert cache.principal("backend", "pw") is None  # checked, but the login was not accepted yet
    cache.accept("backend", "tag2", principal)  # another credential: ignored
    assert cache.principal("backend", "pw") is None
    cache.accept("backend", "tag1", principal)
    assert cache.principal("backend", "pw") is principal
    assert cache.principal("backend", "other") is None
    assert cache.holds("backend", "tag1") is True
    assert cache.holds("backend", "tag2") is False
    cache.drop("backend")
    assert cache.principal("backend", "pw") is None
    assert cache.holds("backend", "tag1") is False
