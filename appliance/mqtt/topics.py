"""Topic name and topic filter rules (MQTT 3.1.1 §4.7, MQTT 5 §4.7 and §4.8.2).

The checks return a problem description (or ``None``) so that the decoder can
turn it into a ``RemoteProtocolError`` and the packet constructors into a
``LocalProtocolError``.
"""

from __future__ import annotations

__all__ = ["topic_name_problem", "topic_filter_problem", "is_shared"]

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
