"""Topic names and topic filters (MQTT 3.1.1 §4.7, MQTT 5 §4.7 and §4.8.2): the one place that
knows their rules and how filters match.

- Validity: `topic_name_problem` and `topic_filter_problem` return a problem description (or
  ``None``) so that the decoder can turn it into a ``RemoteProtocolError`` and the packet
  constructors into a ``LocalProtocolError``.
- Matching, with MQTT semantics: `+` matches exactly one level, `#` matches the parent level and
  everything below it, and wildcards at the first level do not match topics that start with `$`
  (§4.7.2). `topic_matches` (one filter, one topic), `TopicTrie` (many filters, one dict lookup per
  topic level), `filter_covers` (one filter matches everything another matches: ACL grants, schema
  set compatibility) and `filters_overlap` (some topic matches both).
- `topic_filter_regex`: the same matching as a regular expression, for SQL (DuckDB's
  `regexp_full_match`, RE2) and `re.fullmatch`, where the topics to match are rows, not a stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = [
    "TopicTrie", "filter_covers", "filters_overlap", "is_shared", "topic_filter_problem", "topic_filter_regex",
    "topic_matches", "topic_name_problem",
]

SHARE_PREFIX = "$share/"


def topic_name_problem(topic: str) -> str | None:
    if "+" in topic or "#" in topic:
        return f"wildcard in topic name {topic!r}"
    if "\x00" in topic:
        return "U+0000 in topic name"
    return None


def is_shared(topic_filter: str) -> bool:
    return topic_filter.startswith(SHARE_PREFIX)


def topic_filter_problem(topic_filter: str) -> str | None:
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "U+0000 in topic filter"
    if topic_filter.startswith(SHARE_PREFIX):
        share_name, sep, topic_filter = topic_filter[len(SHARE_PREFIX):].partition("/")
        if not share_name or not sep or not topic_filter:
            return "shared subscription needs $share/{ShareName}/{filter}"
        if "+" in share_name or "#" in share_name:
            return "wildcard in share name"
    if "+" not in topic_filter and "#" not in topic_filter:
        return None
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "+" or (level == "#" and i == last):
            continue
        if "+" in level or "#" in level:
            return f"misplaced wildcard in topic filter {topic_filter!r}"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter`."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def topic_filter_regex(topic_filter: str) -> str:
    """`topic_filter` as a full-match regular expression in the syntax RE2 and Python share: `+` is one
    level, `#` the parent level and everything below it, and a wildcard at the first level does not
    match `$`-topics (§4.7.2), exactly as `topic_matches` (tests/mqtt/test_topics.py checks both agree)."""
    parts: list[str] = []
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        first = index == 0
        if level == "#" and index == len(levels) - 1:
            tail = "(?:[^$].*)?" if first else ".*"
            # "a/#" matches "a" itself as well as everything below it.
            return "/".join(parts) + "(?:/" + tail + ")?" if parts else tail
        if level == "+":
            parts.append("(?:[^$/][^/]*)?" if first else "[^/]*")
        else:
            parts.append(re.escape(level))
    return "/".join(parts)


def filter_covers(outer: str, inner: str) -> bool:
    """Whether every topic that matches filter `inner` also matches filter `outer`."""
    o_levels, i_levels = outer.split("/"), inner.split("/")
    if inner.startswith("$") and o_levels[0] in ("+", "#"):
        return False  # wildcards at the first level never match $-topics (MQTT §4.7.2)
    for i, level in enumerate(o_levels):
        if level == "#":
            return True
        if i >= len(i_levels):
            return False
        if i_levels[i] == "#":
            return False  # inner goes deeper than outer allows
        if level != "+" and (i_levels[i] == "+" or level != i_levels[i]):
            return False
    return len(o_levels) == len(i_levels)


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters, level by level. `$` topics are not special here: a
    deny rule `+/x` overlaps a subscription to `$SYS/x` (refusing too much, never too little)."""
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


T = TypeVar("T")


class _Node(Generic[T]):
    __slots__ = ("children", "plus", "hash_value", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.plus: _Node[T] | None = None
        self.hash_value: tuple[str, T] | None = None
        self.value: tuple[str, T] | None = None


class TopicTrie(Generic[T]):
    """Maps topic filters to values; `match(topic)` finds every filter that matches a topic. When
    several match, the most specific comes first: at the first level where they differ, a literal
    beats `+`, and `+` beats `#`."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def insert(self, topic_filter: str, value: T) -> None:
        problem = topic_filter_problem(topic_filter)
        if problem or is_shared(topic_filter):
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
