"""Topic filters matched against topic names with a trie (one dict lookup per topic level).

MQTT semantics: `+` matches exactly one level, `#` matches the parent level and everything below
it, and wildcards at the first level do not match topics that start with `$` (MQTT §4.7.2).
When several filters match, `match()` returns the most specific first: at the first level where
they differ, a literal beats `+`, and `+` beats `#`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from appliance.mqtt.topics import topic_filter_problem

T = TypeVar("T")


class _Node(Generic[T]):
    __slots__ = ("children", "plus", "hash_value", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.plus: _Node[T] | None = None
        self.hash_value: tuple[str, T] | None = None
        self.value: tuple[str, T] | None = None


class TopicTrie(Generic[T]):
    """Maps topic filters to values; `match(topic)` finds every filter that matches a topic."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def insert(self, topic_filter: str, value: T) -> None:
        problem = topic_filter_problem(topic_filter)
        if problem or topic_filter.startswith("$share/"):
            raise ValueError(problem or "a shared-subscription filter cannot be used here")
        node = self._root
        levels = topic_filter.split("/")
        for level in levels[:-1] if levels[-1] == "#" else levels:
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                node = node.children.setdefault(level, _Node())
        if levels[-1] == "#":
            if node.hash_value is None:
                self._size += 1
            node.hash_value = (topic_filter, value)
        else:
            if node.value is None:
                self._size += 1
            node.value = (topic_filter, value)

    def match(self, topic: str) -> list[tuple[str, T]]:
        """Every (filter, value) matching `topic`, most specific first."""
        found: list[tuple[str, T]] = []
        self._walk(self._root, topic.split("/"), 0, found, topic.startswith("$"))
        return found

    def _walk(self, node: _Node[T], levels: list[str], i: int, found: list[tuple[str, T]], system: bool) -> None:
        # Literal first, then +, then #: depth-first in that order yields the most specific first.
        if i == len(levels):
            if node.value is not None:
                found.append(node.value)
            if node.hash_value is not None:  # "a/#" matches "a"
                found.append(node.hash_value)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, found, system)
        wildcard_ok = not (system and i == 0)
        if node.plus is not None and wildcard_ok:
            self._walk(node.plus, levels, i + 1, found, system)
        if node.hash_value is not None and wildcard_ok:
            found.append(node.hash_value)

    def best(self, topic: str) -> tuple[str, T] | None:
        found = self.match(topic)
        return found[0] if found else None

    def __iter__(self) -> Iterator[tuple[str, T]]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.value is not None:
                yield node.value
            if node.hash_value is not None:
                yield node.hash_value
            stack.extend(node.children.values())
            if node.plus is not None:
                stack.append(node.plus)


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters (MQTT wildcards), level by level."""
    levels_a, levels_b = a.split("/"), b.split("/")
    for i in range(max(len(levels_a), len(levels_b))):
        x = levels_a[i] if i < len(levels_a) else None
        y = levels_b[i] if i < len(levels_b) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and x != "+" and y != "+":
            return False
    return True
