"""Pair the schemas of two sets, run the format's rules on each pair, and judge them by mode.

Schemas pair up by name without the version (`temperature:v1` ↔ `temperature:v2`) and, for the
rest, by the topic filter both sets map to them (`sensor/+/temperature`: `temp:v1` ↔
`temperature:v2`). Every result says which.
"""

from __future__ import annotations

from typing import Any

from appliance.governance.schemaset import SchemaSet
from replay.compat.avro_rules import compare_avro
from replay.compat.json_rules import compare_json_schemas
from replay.compat.manifest import read_modes
from replay.compat.model import (
    BOTH,
    DEFAULT_MODE,
    CompatReport,
    Finding,
    Mode,
    SchemaResult,
    TopicResult,
)
from replay.compat.proto_rules import compare_messages
from replay.compat.refs import Documents
from replay.compat.sparkplug_rules import compare_sparkplug
from replay.compat.topics import compare_topics


def compare_sets(
    old: SchemaSet, new: SchemaSet, *, modes: dict[str, Mode] | None = None, topics_mode: Mode = DEFAULT_MODE
) -> CompatReport:
    """Judge `new` against `old`: every paired schema under its mode, and the topics.

    `modes` maps schema names (`temperature:v2` or `temperature`) to modes; a schema it does not
    name takes `compatibility:` from the new set's manifest, else BACKWARD."""
    return _Comparison([old, new], modes, topics_mode).run()


def compare_chain(
    sets: list[SchemaSet], *, modes: dict[str, Mode] | None = None, topics_mode: Mode = DEFAULT_MODE
) -> CompatReport:
    """Judge the last set of an ordered history: against the one before it in every mode, and
    against every earlier set too for schemas whose mode is *_TRANSITIVE."""
    if len(sets) < 2:
        raise ValueError("compare_chain needs at least two schema sets, oldest first")
    return _Comparison(list(sets), modes, topics_mode).run()


class _Comparison:
    def __init__(self, sets: list[SchemaSet], modes: dict[str, Mode] | None, topics_mode: Mode):
        self.sets = sets
        self.new = sets[-1]
        self.modes = {**read_modes(self.new.directory), **(modes or {})}
        self.topics_mode = topics_mode
        self._documents: dict[int, Documents] = {}

    def run(self) -> CompatReport:
        previous = self.sets[-2]
        results: list[SchemaResult] = []
        topics: list[TopicResult] = []
        added: list[str] = []
        removed: list[str] = []
        for index, old in enumerate(self.sets[:-1]):
            latest = old is previous
            pairs, only_new, only_old = pair_schemas(old, self.new)
            if latest:
                added, removed = only_new, only_old
            for old_name, new_name, paired_by in pairs:
                mode = self.mode_of(new_name)
                if latest or mode.transitive:
                    results.append(self.compare_schema(old, old_name, new_name, mode, paired_by))
            if latest or self.topics_mode.transitive:
                topics.append(TopicResult(self.topics_mode, old.version, self.new.version, tuple(compare_topics(old, self.new))))
        compared = {r.old_version for r in results} | {t.old_version for t in topics}
        earliest = next((s.version for s in self.sets if s.version in compared), previous.version)
        return CompatReport(
            old_version=earliest,
            new_version=self.new.version,
            schemas=tuple(results),
            topics=tuple(topics),
            added=tuple(added),
            removed=tuple(removed),
        )

    def mode_of(self, name: str) -> Mode:
        return self.modes.get(name) or self.modes.get(_base(name)) or DEFAULT_MODE

    def compare_schema(self, old_set: SchemaSet, old_name: str, new_name: str, mode: Mode, paired_by: str) -> SchemaResult:
        old, new = old_set.schemas[old_name], self.new.schemas[new_name]
        findings: list[Finding] = []
        warnings: list[str] = []
        fmt = new.format
        if old.format != new.format:
            fmt = f"{old.format} -> {new.format}"
            findings.append(Finding("format changed", "/", old.format, new.format, BOTH,
                                    detail="payloads valid for one format are not valid for the other"))
        elif new.format == "jsonschema":
            old_docs, new_docs = self.documents(old_set), self.documents(self.new)
            found, warned = compare_json_schemas(
                _attr(old, "document"), _attr(new, "document"),
                old_docs=old_docs, new_docs=new_docs,
                old_base=old_docs.uri_of(_attr(old, "file")), new_base=new_docs.uri_of(_attr(new, "file")),
            )
            findings.extend(found)
            warnings.extend(warned)
        elif new.format == "protobuf":
            findings.extend(compare_messages(
                _descriptor(old), _descriptor(new),
                old_strict=not _attr(old, "allow_unknown_fields"), new_strict=not _attr(new, "allow_unknown_fields"),
            ))
        elif new.format == "avro":
            findings.extend(compare_avro(old, new))
        elif new.format == "sparkplug_b":
            findings.extend(compare_sparkplug(old, new))
        else:
            warnings.append(f"could not analyse format {new.format!r}")
        return SchemaResult(
            name=new_name, old_name=old_name, format=fmt, mode=mode, paired_by=paired_by,
            old_version=old_set.version, new_version=self.new.version,
            findings=tuple(findings), warnings=tuple(warnings),
        )

    def documents(self, schema_set: SchemaSet) -> Documents:
        key = id(schema_set)
        if key not in self._documents:
            self._documents[key] = Documents(schema_set.directory)
        return self._documents[key]


def pair_schemas(old: SchemaSet, new: SchemaSet) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """([(old name, new name, paired by)], names only in new, names only in old)."""
    pairs: list[tuple[str, str, str]] = []
    old_by_base: dict[str, list[str]] = {}
    for name in sorted(old.schemas):
        old_by_base.setdefault(_base(name), []).append(name)
    for name in sorted(new.schemas):
        for old_name in old_by_base.get(_base(name), []):
            pairs.append((old_name, name, "name"))
    paired_old = {p[0] for p in pairs}
    paired_new = {p[1] for p in pairs}
    old_maps = {f: m.schema_name for f, m in old.mappings}
    for topic_filter, mapping in sorted(new.mappings, key=lambda item: item[0]):
        was, now = old_maps.get(topic_filter), mapping.schema_name
        if was is None or now is None or (was in paired_old and now in paired_new):
            continue
        pairs.append((was, now, f"topic filter {topic_filter}"))
        paired_old.add(was)
        paired_new.add(now)
    only_new = sorted(set(new.schemas) - paired_new)
    only_old = sorted(set(old.schemas) - paired_old)
    return pairs, only_new, only_old


def _base(name: str) -> str:
    return name.split(":", 1)[0]


def _attr(schema: Any, name: str) -> Any:
    return getattr(schema, name)


def _descriptor(schema: Any) -> Any:
    """The message descriptor of a ProtobufSchema. It has no public accessor yet: its message class
    (private `_class`) carries the descriptor."""
    descriptor = getattr(schema, "descriptor", None)
    if descriptor is None:
        descriptor = schema._class.DESCRIPTOR
    return descriptor
