"""What a replay found, aggregated: counts per (topic filter, schema) of the target set, the
rejection reasons grouped with their values normalised, and a few samples of each.

A worker fills one `Tally` per batch and sends it back; the parent `merge()`s them. Tallies are
small (one entry per group and per distinct normalised reason), whatever the number of messages.

Normalising reasons, so that "150 is greater than the maximum of 125" and "130 is greater than
the maximum of 125" count as one reason:
1. the offending value a schema message starts with (`150 is ...`, `"abc" is not of type ...`)
   becomes `<value>`; a property name (`"unit" is a required property`) is kept;
2. quoted topic names and client ids (`topic 'x/y'`, `client 'c1'`) become `'…'`;
3. every remaining number, including array indexes in paths (`/readings/3`), becomes `N`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

SAMPLES_PER_REASON = 3
PAYLOAD_EXCERPT = 160

# The instance value a jsonschema-rs message starts with: a JSON string, object, array, number,
# boolean or null, followed by what is wrong with it.
_LEADING_VALUE = re.compile(
    r'^(?:"(?:[^"\\]|\\.)*"|\{.*\}|\[.*\]|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)'
    r"(?= (?:is not|is greater|is less|is too|does not|has (?:more|less|fewer)|should not|is a multiple))"
)
_QUOTED_NAME = re.compile(r"\b(topic|client) '(?:[^'\\]|\\.)*'")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w])")


def normalise(message: str, path: str | None) -> tuple[str, str | None]:
    message = _LEADING_VALUE.sub("<value>", message, count=1)
    message = _QUOTED_NAME.sub(r"\1 '…'", message)
    message = _NUMBER.sub("N", message)
    if path:
        path = _NUMBER.sub("N", path)
    return message, path or None


def numbers(message: str) -> tuple[str, ...]:
    """The numbers step 3 of `normalise` replaces, in order (the offending value excluded)."""
    message = _QUOTED_NAME.sub(r"\1 '…'", _LEADING_VALUE.sub("<value>", message, count=1))
    return tuple(match.group(0) for match in _NUMBER.finditer(message))


def common_numbers(a: tuple[str | None, ...] | None, b: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """Per position, the number every message of a reason has there (a limit), else None."""
    if a is None:
        return b
    return tuple(x if x == y else None for x, y in zip(a, b, strict=False))


def detail(message: str, limits: tuple[str | None, ...] | None) -> str:
    """The normalised message with the numbers all its messages share put back: "<value> is greater
    than the maximum of 100", not "... of N"."""
    if not limits:
        return message
    values = iter(limits)
    return re.sub(r"\bN\b", lambda match: next(values, None) or "N", message)


@dataclass(slots=True)
class Sample:
    topic: str
    client_id: str
    ts: float | None
    payload: str  # an excerpt: text when the payload is UTF-8, else "hex:" and the first bytes
    recorded: str | None  # the reference verdict it was compared with, if any
    breaking: bool

    def to_dict(self) -> dict[str, object]:
        from datetime import UTC, datetime

        when = datetime.fromtimestamp(self.ts, UTC).isoformat() if self.ts is not None else None
        return {"topic": self.topic, "client_id": self.client_id, "time": when, "payload": self.payload,
                "reference": self.recorded, "breaking": self.breaking}


def excerpt(payload: bytes) -> str:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and (text.isprintable() or not text):
        return text if len(text) <= PAYLOAD_EXCERPT else text[:PAYLOAD_EXCERPT] + "…"
    head = payload[: PAYLOAD_EXCERPT // 2].hex(" ")
    return "hex:" + head + (" …" if len(payload) > PAYLOAD_EXCERPT // 2 else "")


@dataclass(slots=True)
class ReasonTally:
    check: str
    path: str | None
    message: str
    count: int = 0  # messages the target rejected for this reason
    breaking: int = 0  # of those, the ones the reference accepted (or that had no reference)
    samples: list[Sample] = field(default_factory=list)
    limits: tuple[str | None, ...] | None = None  # see common_numbers

    def wants_sample(self, breaking: bool) -> bool:
        """Cheap test before building a Sample: room left, or a breaking one could replace another."""
        samples = self.samples
        if len(samples) < SAMPLES_PER_REASON:
            return True
        return breaking and not (samples[0].breaking and samples[1].breaking and samples[2].breaking)

    def add_sample(self, sample: Sample) -> None:
        """Keep up to three, preferring samples of breaking messages."""
        if len(self.samples) < SAMPLES_PER_REASON:
            self.samples.append(sample)
        elif sample.breaking:
            for index, kept in enumerate(self.samples):
                if not kept.breaking:
                    self.samples[index] = sample
                    return

    def merge(self, other: ReasonTally) -> None:
        self.count += other.count
        self.breaking += other.breaking
        if other.limits is not None:
            self.limits = common_numbers(self.limits, other.limits)
        for sample in other.samples:
            self.add_sample(sample)


GroupKey = tuple[str, str | None]

UNMAPPED = "(no mapping)"


@dataclass(slots=True)
class GroupTally:
    """One topic filter (and its schema) of the target set. Messages the target maps nowhere are
    grouped under the topic filter they were recorded with, or `(no mapping)`."""

    topic_filter: str
    schema: str | None
    replayed: int = 0
    accepted: int = 0  # by the target
    rejected: int = 0  # by the target
    still_accepted: int = 0
    still_rejected: int = 0
    newly_rejected: int = 0  # breaking: the reference accepted it, the target rejects it
    newly_accepted: int = 0
    # No recorded verdict and no baseline to judge it with: nothing to compare with, so a rejection
    # counts as breaking (the recording is taken to be traffic that should pass).
    accepted_without_reference: int = 0
    rejected_without_reference: int = 0
    unmapped: int = 0  # no mapping in the target set (allowed unmapped, or topic not allowed)
    errors: int = 0  # could not be judged (payload removed by retention, ...)
    reasons: dict[tuple[str, str | None, str], ReasonTally] = field(default_factory=dict)
    error_reasons: Counter[str] = field(default_factory=Counter)

    COUNTS = ("replayed", "accepted", "rejected", "still_accepted", "still_rejected", "newly_rejected",
              "newly_accepted", "accepted_without_reference", "rejected_without_reference", "unmapped", "errors")

    @property
    def breaking(self) -> int:
        return self.newly_rejected + self.rejected_without_reference

    @property
    def compared(self) -> int:
        """Messages judged and compared with a reference verdict (or assumed to pass)."""
        return self.replayed - self.errors

    def merge(self, other: GroupTally) -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, reason in other.reasons.items():
            mine = self.reasons.get(key)
            if mine is None:
                self.reasons[key] = reason
            else:
                mine.merge(reason)
        self.error_reasons.update(other.error_reasons)


@dataclass(slots=True)
class Tally:
    groups: dict[GroupKey, GroupTally] = field(default_factory=dict)
    recorded_sets: Counter[str] = field(default_factory=Counter)  # schema_set column → messages

    def group(self, topic_filter: str, schema: str | None) -> GroupTally:
        key = (topic_filter, schema)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = GroupTally(topic_filter, schema)
        return group

    @property
    def errors(self) -> int:
        return sum(group.errors for group in self.groups.values())

    def merge(self, other: Tally) -> None:
        for key, group in other.groups.items():
            mine = self.groups.get(key)
            if mine is None:
                self.groups[key] = group
            else:
                mine.merge(group)
        self.recorded_sets.update(other.recorded_sets)

    @property
    def replayed(self) -> int:
        return sum(group.replayed for group in self.groups.values())
