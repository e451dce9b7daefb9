"""The one topic-filter module (appliance/mqtt/topics.py): matching, coverage and overlap against
the MQTT definition written plainly."""

from __future__ import annotations

import re

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.mqtt.topics import TopicTrie, filter_covers, filters_overlap, topic_filter_regex, topic_matches


def matches(topic_filter: str, topic: str) -> bool:
    """The MQTT definition, written plainly, to check the trie against."""
    f, t = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("sensor/+/temperature", "sensor/t1/temperature", True),
        ("sensor/+/temperature", "sensor/t1/humidity", False),
        ("sensor/+/temperature", "sensor/temperature", False),
        ("events/#", "events", True),
        ("events/#", "events/a/b/c", True),
        ("#", "anything/at/all", True),
        ("#", "$SYS/broker", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/+", "a/", True),
        ("+", "", True),
        ("/+", "/x", True),
    ],
)
def test_mqtt_matching(topic_filter, topic, expected):
    trie: TopicTrie[int] = TopicTrie()
    trie.insert(topic_filter, 1)
    assert bool(trie.match(topic)) is expected
    assert matches(topic_filter, topic) is expected
    assert topic_matches(topic_filter, topic) is expected


def test_most_specific_first():
    trie: TopicTrie[str] = TopicTrie()
    for f in ["#", "sensor/#", "sensor/+/temperature", "sensor/t1/temperature", "sensor/+/+"]:
        trie.insert(f, f)
    assert [f for f, _ in trie.match("sensor/t1/temperature")] == [
        "sensor/t1/temperature", "sensor/+/temperature", "sensor/+/+", "sensor/#", "#",
    ]
    assert trie.best("other") == ("#", "#")
    assert len(trie) == 5


@pytest.mark.parametrize("bad", ["a/#/b", "a+", "", "$share/g/a"])
def test_invalid_filters_refused(bad):
    with pytest.raises(ValueError):
        TopicTrie().insert(bad, 1)


levels = st.sampled_from(["a", "b", "", "$x"])
filters = st.lists(st.sampled_from(["a", "b", "", "+"]), min_size=1, max_size=4).flatmap(
    lambda ls: st.sampled_from(["/".join(ls), "/".join([*ls, "#"]), "#"])
).filter(bool)


@given(st.lists(filters, min_size=1, max_size=6, unique=True), st.lists(levels, min_size=1, max_size=5))
def test_trie_agrees_with_definition(filter_list, topic_levels):
    topic = "/".join(topic_levels)
    trie: TopicTrie[str] = TopicTrie()
    for f in filter_list:
        trie.insert(f, f)
    assert sorted(f for f, _ in trie.match(topic)) == sorted(f for f in filter_list if matches(f, topic))


@given(filters, st.lists(levels, min_size=1, max_size=5))
def test_topic_matches_agrees_with_definition(topic_filter, topic_levels):
    topic = "/".join(topic_levels)
    assert topic_matches(topic_filter, topic) is matches(topic_filter, topic)


# Levels a regex could get wrong: a `$` first level, regex metacharacters, an empty level.
regex_levels = st.sampled_from(["a", "a.b", "", "$SYS", "(x)*"])
regex_filters = st.lists(st.one_of(regex_levels, st.just("+")), min_size=1, max_size=4).flatmap(
    lambda ls: st.sampled_from(["/".join(ls), "/".join([*ls, "#"]), "#"])
)


@given(regex_filters, st.lists(regex_levels, min_size=1, max_size=5))
def test_topic_filter_regex_agrees_with_definition(topic_filter, topic_levels):
    topic = "/".join(topic_levels)
    assert (re.fullmatch(topic_filter_regex(topic_filter), topic) is not None) is matches(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("+/x", "$SYS/x", False),
    ("#", "$SYS/x", False),
    ("#", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("+", "$SYS", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/+", "$SYS/x", True),
    ("a/+/$x", "a/b/$x", True),  # only the first level is special
    ("a/#", "a", True),
    ("a.b/+", "axb/c", False),
    ("+/x", "/x", True),
])
def test_topic_filter_regex_dollar_topics(topic_filter, topic, expected):
    """Wildcards at the first level do not match `$`-topics (§4.7.2), in Python's re and in DuckDB's RE2."""
    regex = topic_filter_regex(topic_filter)
    assert (re.fullmatch(regex, topic) is not None) is expected is topic_matches(topic_filter, topic)
    [(sql,)] = duckdb.execute("SELECT regexp_full_match(?, ?)", [topic, regex]).fetchall()
    assert sql is expected


@pytest.mark.parametrize(("wide", "narrow", "covered"), [
    ("sensor/#", "sensor/+/temperature", True),
    ("sensor/#", "sensor", True),
    ("sensor/+/temperature", "sensor/#", False),
    ("+/+/temperature", "sensor/t1/temperature", True),
    ("events/alerts/+", "events/#", False),
    ("#", "$SYS/broker", False),
    ("#", "$SYS/#", False),
    ("+/broker/#", "$SYS/broker/load", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("a/+", "a/b/c", False),
    ("a/#", "a/+/c", True),
    ("a/+", "a/#", False),
    ("+/b", "x/b", True),
])
def test_filter_covers(wide, narrow, covered):
    assert filter_covers(wide, narrow) is covered


# Every topic of up to four levels over a small alphabet: enough to decide coverage by brute force.
_TOPICS = ["/".join(t) for n in range(1, 5) for t in __import__("itertools").product(["a", "b", "", "$x"], repeat=n)]


@given(filters, filters)
def test_filter_covers_agrees_with_definition(wide, narrow):
    """`wide` covers `narrow` exactly when no topic (of the sample) matches `narrow` but not `wide`,
    for filters whose every match lies within the sample (at most four levels, no `#`)."""
    if "#" in narrow:
        return  # `#` matches topics of any depth: not decidable by this sample
    expected = all(matches(wide, t) for t in _TOPICS if matches(narrow, t))
    assert filter_covers(wide, narrow) is expected


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("sensor/#", "#", True), ("sensor/t1", "sensor/+", True), ("a/b", "a/c", False),
    ("a/b", "a/b/c", False), ("a/#", "a", True), ("+/x", "y/+", True), ("a/+", "a/b/c", False),
    ("a/+", "+/b", True),
])
def test_filters_overlap(a, b, overlap):
    assert filters_overlap(a, b) is overlap and filters_overlap(b, a) is overlap
