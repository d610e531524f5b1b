"""Topic tries: matching that costs what matches, not everything stored (MQTT 3.1.1 §4.7).

amqtt 0.12.1 matched every publish against every subscription filter, and every new
subscription against every retained message. :class:`FilterTree` holds the filters anyone
subscribed to, level by level, and gives the filters a topic matches; :class:`TopicTree` holds the
topics that retain a message and gives the topics a filter matches. Both walk only the levels that
can match. The ``$`` rule [MQTT-4.7.2-1]: a filter starting with ``+`` or ``#`` does not match a
topic starting with ``$``. Filters are stored as given; they are checked (wildcards whole levels,
``#`` last) before they get here.
"""

from __future__ import annotations

from collections.abc import Iterator


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        #: The whole filter or topic ending at this node, if one was added.
        self.value: str | None = None


class _Tree:
    """Strings split at ``/``, one node per level; removing a string prunes the emptied nodes."""

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0

    def add(self, name: str) -> None:
        """Hold ``name`` (again: nothing changes)."""
        node = self._root
        for level in name.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.value is None:
            node.value = name
            self._count += 1

    def remove(self, name: str) -> None:
        """Stop holding ``name`` (not held: nothing changes)."""
        path = [self._root]
        levels = name.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        if path[-1].value is None:
            return
        path[-1].value = None
        self._count -= 1
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.value is not None or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def clear(self) -> None:
        """Hold nothing."""
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count


class FilterTree(_Tree):
    """Subscription filters; :meth:`matching` gives the ones a published topic matches."""

    def matching(self, topic: str) -> list[str]:
        """The filters held that match ``topic`` (a topic name, no wildcards)."""
        levels = topic.split("/")
        last = len(levels)
        dollar = topic.startswith("$")
        found: list[str] = []
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            children = node.children
            wildcards = not (dollar and depth == 0)
            if wildcards:
                # 'a/#' matches 'a' and everything under it [MQTT-4.7.1-2].
                rest = children.get("#")
                if rest is not None and rest.value is not None:
                    found.append(rest.value)
            if depth == last:
                if node.value is not None:
                    found.append(node.value)
                continue
            exact = children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            if wildcards:
                one = children.get("+")
                if one is not None:
                    stack.append((one, depth + 1))
        return found


class TopicTree(_Tree):
    """Topics that retain a message; :meth:`matching` gives the ones a filter matches."""

    def matching(self, topic_filter: str) -> list[str]:
        """The topics held that ``topic_filter`` matches."""
        levels = topic_filter.split("/")
        last = len(levels)
        found: list[str] = []
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.value is not None:
                    found.append(node.value)
                continue
            level = levels[depth]
            if level == "#":
                if node.value is not None:  # 'a/#' matches 'a' (never true at the root)
                    found.append(node.value)
                for name, child in node.children.items():
                    if depth > 0 or not name.startswith("$"):
                        found.extend(_values_under(child))
            elif level == "+":
                for name, child in node.children.items():
                    if depth > 0 or not name.startswith("$"):
                        stack.append((child, depth + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, depth + 1))
        return found


def _values_under(node: _Node) -> Iterator[str]:
    stack = [node]
    while stack:
        current = stack.pop()
        if current.value is not None:
            yield current.value
        stack.extend(current.children.values())
