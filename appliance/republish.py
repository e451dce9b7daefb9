"""What a mapping's dead-letter republish is (`on_reject: {republish: {...}}`, docs/schemas.md "Dead-letter topics"): the declaration, its checks (placeholders, loops) and topic rendering; pure. The republisher is `appliance/deadletter/`.

Declared once per mapping, checked when the set loads, rendered per rejected message. Pure: no
I/O, no imports from the governance package (which imports this), so a manifest can be checked
anywhere (the appliance, `replay`, `appliance check`).

A topic template is text with placeholders: `{topic}` (the rejected message's topic: whole levels,
`deadletter/{topic}` or `{topic}/invalid`), `{client_id}`, `{schema}` (the mapping's schema name,
`none` without one) and `{check}` (what rejected it: `schema` or `rule`). `{client_id}` and `{check}`
stay inside one level: `/`, `+`, `#` and U+0000 in them become `_`, as in `upstream.topic_template`.

No loops, by construction (docs/schemas.md, "Dead-letter topics"): a dead letter is published
straight to the broker or appended for the forwarder, never judged; and every topic a template can
produce must lie outside the set's `topic_patterns`. So no dead letter could be judged even if it
came back through the proxy, and no client can publish a fake one through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from appliance.mqtt.topics import filters_overlap, topic_filter_problem
from appliance.yamlsource import LineDict, did_you_mean

PLACEHOLDERS = ("topic", "client_id", "schema", "check")
DESTINATIONS = ("local", "cloud")
REPUBLISH_KEYS = ("topic", "to", "envelope", "qos", "retain")
ON_REJECT_KEYS = ("action", "republish")
ACTIONS = ("reject", "disconnect")
NO_SCHEMA = "none"  # what {schema} renders as for a mapping without a schema

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})
_ONE_LEVEL = "[^/]*"  # what a sanitized {client_id} or {check} can be


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Where and how one mapping republishes what it rejects."""

    template: str
    # The template cut at its placeholders: literal text, or a placeholder's name in a 1-tuple.
    parts: tuple[str | tuple[str], ...]
    local: bool = True  # publish to the broker behind the proxy
    cloud: bool = False  # append for the forwarder (the cloud broker, via upstream.topic_template)
    envelope: bool = True  # a JSON envelope with the reasons; false: the original payload as is
    qos: int | None = None  # None: the rejected message's QoS, at most 1
    retain: bool = False
    line: int | None = field(default=None, compare=False)  # of `topic` in the manifest, for errors

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(d for d, on in (("local", self.local), ("cloud", self.cloud)) if on)

    def topic(self, topic: str, client_id: str, schema: str | None, check: str) -> str:
        """The dead-letter topic for one rejected message."""
        pieces = []
        for part in self.parts:
            if isinstance(part, str):
                pieces.append(part)
            elif part[0] == "topic":
                pieces.append(topic)
            else:
                value = client_id if part[0] == "client_id" else check if part[0] == "check" else schema or NO_SCHEMA
                pieces.append(value.translate(_UNSAFE))
        text = "".join(pieces)
        # A client id starting with "$" must not make a $-topic (those are the broker's).
        return "_" + text[1:] if text.startswith("$") else text


Problem = Callable[[int | None, str], None]


def parse_on_reject(
    raw: Any, where: str, line: int | None, problem: Problem
) -> tuple[Literal["reject", "disconnect"], DeadLetter | None] | None:
    """A mapping's `on_reject`: `reject`, `disconnect`, or `{action: ..., republish: {...}}`.
    Returns (action, dead letter or None), or None after reporting a problem."""
    if isinstance(raw, str):
        if raw not in ACTIONS:
            problem(line, f"{where}: on_reject must be reject, disconnect or a mapping with `republish`, got {raw!r}")
            return None
        return ("disconnect" if raw == "disconnect" else "reject"), None
    if not isinstance(raw, dict):
        problem(line, f"{where}: on_reject must be reject, disconnect or a mapping with `republish`, got {raw!r}")
        return None
    at = _lines(raw, line)
    ok = True
    for key in raw:
        if key not in ON_REJECT_KEYS:
            problem(at(key), f"{where}.on_reject: unknown key {key!r}{did_you_mean(key, ON_REJECT_KEYS)}")
            ok = False
    action = raw.get("action", "reject")
    if action not in ACTIONS:
        problem(at("action"), f"{where}.on_reject.action must be reject or disconnect, got {action!r}")
        ok = False
    dead_letter = None
    if "republish" in raw:
        dead_letter = parse_republish(raw["republish"], f"{where}.on_reject.republish", at("republish"), problem)
        ok = ok and dead_letter is not None
    if not ok:
        return None
    return ("disconnect" if action == "disconnect" else "reject"), dead_letter


def parse_republish(raw: Any, where: str, line: int | None, problem: Problem) -> DeadLetter | None:
    if not isinstance(raw, dict):
        problem(line, f"{where} must be a mapping with at least `topic`, got {raw!r}")
        return None
    at = _lines(raw, line)
    ok = True
    for key in raw:
        if key not in REPUBLISH_KEYS:
            problem(at(key), f"{where}: unknown key {key!r}{did_you_mean(key, REPUBLISH_KEYS)}")
            ok = False
    template = raw.get("topic")
    parts = None
    if template is None:
        problem(line, f"{where}: needs `topic` (e.g. deadletter/{{topic}})")
        ok = False
    else:
        parts = parse_template(template, lambda message: problem(at("topic"), f"{where}.topic: {message}"))
        ok = ok and parts is not None
    to = raw.get("to", ["local"])
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to or any(d not in DESTINATIONS for d in to) or len(set(to)) != len(to):
        problem(at("to"), f"{where}.to must be local, cloud or a list of them ([local, cloud]), got {to!r}")
        ok = False
        to = []
    envelope = raw.get("envelope", True)
    if not isinstance(envelope, bool):
        problem(at("envelope"), f"{where}.envelope must be true (a JSON envelope) or false (the payload as is)")
        ok = False
    qos = raw.get("qos")
    if qos is not None and (isinstance(qos, bool) or qos not in (0, 1)):
        problem(at("qos"), f"{where}.qos must be 0 or 1 (unset: the rejected message's QoS, at most 1), got {qos!r}")
        ok = False
    retain = raw.get("retain", False)
    if not isinstance(retain, bool):
        problem(at("retain"), f"{where}.retain must be true or false")
        ok = False
    if not ok or parts is None:
        return None
    return DeadLetter(str(template), parts, "local" in to, "cloud" in to, envelope, qos, retain, at("topic"))


def _lines(raw: dict[Any, Any], line: int | None) -> Callable[[str], int | None]:
    """The line of a key of `raw` (the mapping's own line when unknown, or for a plain dict)."""

    def at(key: str) -> int | None:
        return raw.line_of(key) if isinstance(raw, LineDict) and key in raw else line

    return at


def parse_template(template: Any, problem: Callable[[str], None]) -> tuple[str | tuple[str], ...] | None:
    """Cut a topic template at its placeholders; None after reporting what is wrong with it."""
    if not isinstance(template, str) or not template:
        problem(f"must be a non-empty topic template (e.g. deadletter/{{topic}}), got {template!r}")
        return None
    parts: list[str | tuple[str]] = []
    at = 0
    found = []
    for match in _PLACEHOLDER.finditer(template):
        parts.append(template[at:match.start()])
        name = match.group(1)
        if name not in PLACEHOLDERS:
            problem(f"unknown placeholder {{{name}}}{did_you_mean(name, PLACEHOLDERS)} "
                    f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
            return None
        parts.append((name,))
        found.append(match)
        at = match.end()
    parts.append(template[at:])
    literal = "".join(p for p in parts if isinstance(p, str))
    if "{" in literal or "}" in literal:
        problem(f"unbalanced brace in {template!r} (placeholders are {{topic}}, {{client_id}}, {{schema}}, {{check}})")
        return None
    if "+" in literal or "#" in literal or "\x00" in literal:
        problem(f"{template!r} contains a wildcard (+ or #) or U+0000: a dead-letter topic is a topic name, not a filter")
        return None
    if template.startswith("$"):
        problem(f"{template!r} starts with $: $-topics belong to the broker")
        return None
    for match in found:
        if match.group(1) == "topic":
            before_ok = match.start() == 0 or template[match.start() - 1] == "/"
            after_ok = match.end() == len(template) or template[match.end()] == "/"
            if not (before_ok and after_ok):
                problem(f"{{topic}} must fill whole levels (e.g. deadletter/{{topic}} or {{topic}}/invalid), got {template!r}")
                return None
    if len(literal.encode()) > 0xFFFF:
        problem("longer than a topic can be (65,535 bytes)")
        return None
    return tuple(p for p in parts if p != "")


# -- loops ------------------------------------------------------------------------------------------
# A topic shape is a tuple of levels: literal text, _ONE (any one level), a compiled pattern for one
# level, or _ANY (zero or more levels). Shapes are tiny (a few levels): the overlap search is exact
# for filters and conservative (may say "overlaps" when it cannot) for placeholders.

_ONE = "\x00+"
_ANY = "\x00#"
Level = str | re.Pattern[str]


def _filter_shape(topic_filter: str) -> tuple[Level, ...]:
    return tuple(_ONE if level == "+" else _ANY if level == "#" else level for level in topic_filter.split("/"))


def _as_filter(shape: tuple[Level, ...]) -> str | None:
    """The shape as a valid MQTT topic filter when it is one (no placeholder pattern, `#` only last), so
    that mqtt/topics.py judges the overlap; None when only the shape search can."""
    if any(isinstance(level, re.Pattern) for level in shape) or _ANY in shape[:-1]:
        return None
    rendered = "/".join("+" if level == _ONE else "#" if level == _ANY else str(level) for level in shape)
    return rendered if topic_filter_problem(rendered) is None else None


def template_shape(dead_letter: DeadLetter, mapping_filter: str, schema: str | None) -> tuple[Level, ...]:
    """Every topic the template can render for messages on `mapping_filter`: {topic} stands for the
    mapping's filter, {schema} for its schema name, {client_id} and {check} for any one level."""
    shape: list[Level] = []
    level: list[str | tuple[str]] = []

    def close() -> None:
        if level == [("topic",)]:
            shape.extend(_filter_shape(mapping_filter))
        elif all(isinstance(p, str) or p[0] == "schema" for p in level):
            shape.append("".join(p if isinstance(p, str) else (schema or NO_SCHEMA) for p in level))
        else:
            regex = "".join(re.escape(p) if isinstance(p, str) else re.escape(schema or NO_SCHEMA)
                            if p[0] == "schema" else _ONE_LEVEL for p in level)
            shape.append(re.compile(regex))
        level.clear()

    for part in dead_letter.parts:
        if isinstance(part, tuple):
            level.append(part)
            continue
        pieces = part.split("/")
        for i, piece in enumerate(pieces):
            if i:
                close()
            if piece:
                level.append(piece)
    close()
    return tuple(shape)


def _levels_overlap(a: Level, b: Level) -> bool:
    if a == _ONE or b == _ONE:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, str):
        assert isinstance(b, re.Pattern)
        return b.fullmatch(a) is not None
    if isinstance(b, str):
        return a.fullmatch(b) is not None
    return True  # two patterns: could be the same level (conservative)


def shapes_overlap(a: tuple[Level, ...], b: tuple[Level, ...]) -> bool:
    """Whether some topic fits both shapes."""

    @cache
    def fits(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == _ANY:
            return fits(i + 1, j) or (j < len(b) and fits(i, j + 1))
        if j < len(b) and b[j] == _ANY:
            return fits(i, j + 1) or (i < len(a) and fits(i + 1, j))
        if i == len(a) or j == len(b):
            return False
        return _levels_overlap(a[i], b[j]) and fits(i + 1, j + 1)

    return fits(0, 0)


def loop_problem(dead_letter: DeadLetter, mapping_filter: str, schema: str | None, topic_patterns: Iterable[str]) -> str | None:
    """Why this dead-letter template is refused (a topic it can render is one the set judges), or None."""
    shape = template_shape(dead_letter, mapping_filter, schema)
    rendered = _as_filter(shape)
    for pattern in topic_patterns:
        if filters_overlap(rendered, pattern) if rendered is not None else shapes_overlap(shape, _filter_shape(pattern)):
            return (f"dead-letter topic {dead_letter.template!r} can be a topic that topic_patterns entry "
                    f"{pattern!r} allows (here it renders as {_show(shape)}); dead-letter topics must lie outside "
                    "topic_patterns, so that a dead letter is never judged and no client can publish one through "
                    "the proxy (use a prefix of their own, e.g. deadletter/{topic})")
    return None


def _show(shape: tuple[Level, ...]) -> str:
    return "/".join("+" if level == _ONE else "#" if level == _ANY else
                    level.pattern.replace(_ONE_LEVEL, "*").replace("\\", "") if isinstance(level, re.Pattern)
                    else level for level in shape)
