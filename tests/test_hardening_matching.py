"""The topic tries give exactly what amqtt's linear matcher gave, ``$`` rule included, and
the broker keeps them in step with its subscription table and retained store."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
from amqtt.broker import Broker

from broker.embedded.topictree import FilterTree, TopicTree

LEVELS = ("a", "b", "", "$SYS", "$x", "c")
#: amqtt 0.12.1's matcher, the reference: it looks only at ``self.logger``.
_AMQTT = SimpleNamespace(logger=logging.getLogger("reference"))


def _reference(topic: str, topic_filter: str) -> bool:
    return bool(Broker._matches(_AMQTT, topic, topic_filter))


def _topic(rng: random.Random) -> str:
    return "/".join(rng.choice(LEVELS) for _ in range(rng.randint(1, 4)))


def _filter(rng: random.Random) -> str:
    levels = [rng.choice((*LEVELS, "+", "+")) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        levels[-1] = "#"
    return "/".join(levels)


@pytest.mark.parametrize("seed", range(20))
def test_the_tries_match_as_amqtt_did(seed: int) -> None:
    rng = random.Random(seed)
    topics = {_topic(rng) for _ in range(60)}
    filters = {_filter(rng) for _ in range(60)}
    subscriptions, retained = FilterTree(), TopicTree()
    for name in filters:
        subscriptions.add(name)
    for name in topics:
        retained.add(name)
    for topic in topics:
        expected = {f for f in filters if _reference(topic, f)}
        assert sorted(subscriptions.matching(topic)) == sorted(expected), topic
    for topic_filter in filters:
        expected = {t for t in topics if _reference(t, topic_filter)}
        assert sorted(retained.matching(topic_filter)) == sorted(expected), topic_filter


def test_the_dollar_rule_and_parent_level() -> None:
    subscriptions = FilterTree()
    for name in ("#", "+/info", "$SYS/#", "sport/#", "sport/+"):
        subscriptions.add(name)
    assert sorted(subscriptions.matching("$SYS/info")) == ["$SYS/#"]
    assert sorted(subscriptions.matching("sport")) == ["#", "sport/#"]
    assert sorted(subscriptions.matching("sport/tennis")) == ["#", "sport/#", "sport/+"]
    retained = TopicTree()
    for name in ("$SYS/info", "sport", "sport/tennis", "/x"):
        retained.add(name)
    assert sorted(retained.matching("#")) == ["/x", "sport", "sport/tennis"]
    assert sorted(retained.matching("+/info")) == []
    assert sorted(retained.matching("sport/#")) == ["sport", "sport/tennis"]
    assert sorted(retained.matching("+/+")) == ["/x", "sport/tennis"]


def test_removal_prunes_and_counts() -> None:
    tree = FilterTree()
    tree.add("a/b/c")
    tree.add("a/b")
    tree.add("a/b")
    assert len(tree) == 2
    tree.remove("a/b/c")
    tree.remove("a/b/c")
    tree.remove("never/held")
    assert len(tree) == 1
    assert tree.matching("a/b/c") == []
    tree.remove("a/b")
    assert len(tree) == 0
    assert not tree._root.children  # every emptied level is gone
