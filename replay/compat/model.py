"""What a compatibility check says: modes, directions, findings and the report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Direction(str, Enum):
    """Which readers a change can hurt.

    BACKWARD: the new set must accept every message the old set accepted (consumers on the new
    schema read old data). A change that *narrows* what is accepted breaks it.
    FORWARD: the old set must accept every message the new set accepts (old consumers read new
    data). A change that *widens* what is accepted breaks it.
    """

    BACKWARD = "BACKWARD"
    FORWARD = "FORWARD"


BOTH = frozenset({Direction.BACKWARD, Direction.FORWARD})
NARROWING = frozenset({Direction.BACKWARD})
WIDENING = frozenset({Direction.FORWARD})
NEITHER: frozenset[Direction] = frozenset()


class Mode(str, Enum):
    """Compatibility modes as in Confluent Schema Registry."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"

    @classmethod
    def parse(cls, text: str) -> Mode:
        try:
            return cls(str(text).strip().upper())
        except ValueError:
            raise ValueError(f"unknown compatibility mode {text!r} (expected one of {', '.join(m.value for m in cls)})") from None

    @property
    def directions(self) -> frozenset[Direction]:
        base = self.value.removesuffix("_TRANSITIVE")
        if base == "FULL":
            return BOTH
        if base == "NONE":
            return NEITHER
        return frozenset({Direction(base)})

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")


DEFAULT_MODE = Mode.BACKWARD


@dataclass(frozen=True, slots=True)
class Finding:
    """One difference between an old and a new schema.

    `breaks` is the set of directions it breaks (empty: a note that breaks nothing). `proven` is
    False when the change may or may not break (a `pattern` changed, a `oneOf` changed): the
    verdict then counts it as breaking, because compatibility could not be shown.
    """

    kind: str
    path: str
    old: Any
    new: Any
    breaks: frozenset[Direction] = NEITHER
    proven: bool = True
    detail: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("a finding needs a kind")
        if not isinstance(self.breaks, frozenset) or not self.breaks <= BOTH:
            raise ValueError(f"breaks must be a frozenset of Direction, got {self.breaks!r}")

    @property
    def level(self) -> str:
        if not self.breaks:
            return "note"
        return "breaks" if self.proven else "may break"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "old": self.old,
            "new": self.new,
            "breaks": sorted(d.value for d in self.breaks),
            "proven": self.proven,
            "level": self.level,
            "detail": self.detail,
        }


def compatible(findings: Iterable[Finding], mode: Mode) -> bool:
    """No finding breaks a direction the mode checks."""
    return not any(f.breaks & mode.directions for f in findings)


def verdicts(findings: tuple[Finding, ...] | list[Finding]) -> dict[str, bool]:
    """Compatible or not under BACKWARD, FORWARD and FULL."""
    broken = {d for f in findings for d in f.breaks}
    backward = Direction.BACKWARD not in broken
    forward = Direction.FORWARD not in broken
    return {"BACKWARD": backward, "FORWARD": forward, "FULL": backward and forward}


@dataclass(frozen=True, slots=True)
class SchemaResult:
    """One schema of the new set judged against its counterpart in an older set."""

    name: str  # the schema's name in the new set (`temperature:v2`)
    old_name: str  # its counterpart in the old set (`temperature:v1`)
    format: str  # jsonschema, protobuf, or "jsonschema -> protobuf" when it changed
    mode: Mode
    paired_by: str  # "name" or "topic filter sensor/+/temperature"
    old_version: str
    new_version: str
    findings: tuple[Finding, ...] = ()
    warnings: tuple[str, ...] = ()  # parts that could not be analysed (an unresolvable $ref)

    @property
    def verdicts(self) -> dict[str, bool]:
        return verdicts(self.findings)

    @property
    def compatible(self) -> bool:
        return compatible(self.findings, self.mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "old_name": self.old_name,
            "format": self.format,
            "mode": self.mode.value,
            "paired_by": self.paired_by,
            "old_version": self.old_version,
            "new_version": self.new_version,
            "compatible": self.compatible,
            "verdicts": self.verdicts,
            "findings": [f.to_dict() for f in self.findings],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class TopicResult:
    """Topic patterns, schema mappings and the unmapped policy of two sets, judged under `mode`."""

    mode: Mode
    old_version: str
    new_version: str
    findings: tuple[Finding, ...] = ()

    @property
    def verdicts(self) -> dict[str, bool]:
        return verdicts(self.findings)

    @property
    def compatible(self) -> bool:
        return compatible(self.findings, self.mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "old_version": self.old_version,
            "new_version": self.new_version,
            "compatible": self.compatible,
            "verdicts": self.verdicts,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class CompatReport:
    """Everything `replay diff` found between schema sets."""

    old_version: str
    new_version: str
    schemas: tuple[SchemaResult, ...] = ()
    topics: tuple[TopicResult, ...] = ()
    added: tuple[str, ...] = ()  # schema names only in the new set
    removed: tuple[str, ...] = ()  # schema names only in the old set

    @property
    def breaking(self) -> bool:
        return any(not r.compatible for r in self.schemas) or any(not t.compatible for t in self.topics)

    def result(self, name: str, *, old_version: str | None = None) -> SchemaResult:
        """The result for a schema of the new set (`temperature:v2` or just `temperature`)."""
        for r in self.schemas:
            if name in (r.name, r.name.split(":", 1)[0]) and (old_version is None or r.old_version == old_version):
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "old_version": self.old_version,
            "new_version": self.new_version,
            "breaking": self.breaking,
            "schemas": [r.to_dict() for r in self.schemas],
            "topics": [t.to_dict() for t in self.topics],
            "added": list(self.added),
            "removed": list(self.removed),
        }
