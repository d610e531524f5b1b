"""MQTT topic names and filters: validation, matching, and filter coverage (MQTT 3.1.1 §4.7)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from provisioning.errors import ProvisioningError

MAX_FILTER_LENGTH = 256


class InvalidTopicError(ProvisioningError, ValueError):
    """Not a valid MQTT topic filter (or rule)."""

    error_code = "INVALID_TOPIC"


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid MQTT filter, else raise :class:`InvalidTopicError`."""
    if not topic_filter or len(topic_filter) > MAX_FILTER_LENGTH:
        raise InvalidTopicError(f"topic filter must be 1..{MAX_FILTER_LENGTH} characters")
    if "\x00" in topic_filter:
        raise InvalidTopicError("topic filter must not contain NUL")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise InvalidTopicError(f"'#' must be a whole last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise InvalidTopicError(f"'+' must be a whole level: {topic_filter!r}")
    return topic_filter


def matches(topic: str, topic_filter: str) -> bool:
    """True when the topic name ``topic`` matches ``topic_filter``."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels) or (level != "+" and level != t_levels[index]):
            return False
    return len(t_levels) == len(f_levels)


def covers(rule: str, requested: str) -> bool:
    """True when every topic matching filter ``requested`` also matches filter ``rule``."""
    if requested.startswith("$") != rule.startswith("$") and rule[:1] in ("+", "#"):
        return False
    r_levels = rule.split("/")
    q_levels = requested.split("/")
    for index, level in enumerate(r_levels):
        if level == "#":
            return True
        if index >= len(q_levels):
            return False
        asked = q_levels[index]
        if asked == "#":
            return False  # the request reaches deeper than this rule
        if level != "+" and (asked == "+" or asked != level):
            return False
    return len(q_levels) == len(r_levels)


class TopicRule(BaseModel):
    """One ``--allow`` line of a service account: ``subscribe FILTER`` or ``publish FILTER``."""

    model_config = ConfigDict(frozen=True)

    action: Literal["subscribe", "publish"]
    filter: str

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        return validate_filter(value)

    def __str__(self) -> str:
        return f"{self.action} {self.filter}"


def parse_rule(text: str) -> TopicRule:
    """Parse ``"subscribe devices/+/telemetry"`` into a :class:`TopicRule`."""
    action, _, topic_filter = text.strip().partition(" ")
    if action not in ("subscribe", "publish") or not topic_filter.strip():
        raise InvalidTopicError(f"rule must be 'subscribe FILTER' or 'publish FILTER', not {text!r}")
    return TopicRule(action=action, filter=validate_filter(topic_filter.strip()))
