"""Schema sets: a directory with `manifest.yaml` and the schema files it names.

A set is self-contained (its own topic patterns, mappings, schemas and rules), so the appliance and
`replay --against` can each load one. Loading checks everything and reports every problem at once,
each with its file and line; a set that loads is ready for the hot path (schemas compiled, rules
compiled, topics in tries). See docs/schemas.md for the format.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from appliance.republish import DeadLetter, loop_problem, parse_on_reject
from appliance.governance.builtins import MaxPayloadSize, RateLimit, parse_rate
from appliance.governance.errors import SchemaError, SchemaSetError
from appliance.governance.jsonschemas import JsonSchemaFileError, JsonSchemaRegistry
from appliance.mqtt.topics import TopicTrie, filters_overlap
from appliance.yamlsource import LineDict, YamlError, did_you_mean, load_yaml

MANIFEST = "manifest.yaml"
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)?$")
TOP_LEVEL_KEYS = {"version", "description", "topic_patterns", "schema_mappings", "schema_files", "rules", "policy"}
FILE_KEYS = {
    "file", "format", "message", "allow_unknown_fields", "compatibility",
    "encoding", "schema_ids", "writers",  # avro
    "node_metrics", "device_metrics",  # sparkplug_b
}
FORMATS = ("jsonschema", "protobuf", "avro", "sparkplug_b")
COMPATIBILITY_MODES = {"NONE", "BACKWARD", "FORWARD", "FULL", "BACKWARD_TRANSITIVE", "FORWARD_TRANSITIVE", "FULL_TRANSITIVE"}
MAPPING_KEYS = {"schema", "on_reject", "forward", "forward_qos"}


class PayloadSchema(Protocol):
    name: str
    format: str

    def validate(self, payload: bytes) -> tuple[Any, list[SchemaError]]: ...


class CompiledRules(Protocol):
    def evaluate(self, activation: Any) -> Any: ...

    def evaluate_message(self, payload: object, topic: str, client_id: str, username: str | None, peer: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class Mapping:
    """What applies to the topics one filter maps: a schema, rules, limits and the reject policy."""

    topic_filter: str
    schema_name: str | None
    schema: PayloadSchema | None
    rules: CompiledRules | None = None
    max_payload_size: MaxPayloadSize | None = None
    rate_limit: RateLimit | None = None
    on_reject: Literal["reject", "disconnect"] = "reject"
    forward: bool = True
    forward_qos: int | None = None  # QoS towards the cloud broker; None: upstream.qos
    dead_letter: DeadLetter | None = None  # on_reject.republish: where rejected messages are republished


@dataclass(frozen=True)
class SchemaSet:
    directory: Path
    version: str
    description: str
    topic_patterns: TopicTrie[None]
    mappings: TopicTrie[Mapping]
    schemas: dict[str, PayloadSchema]
    unmapped: Literal["accept", "reject"] = "accept"
    revision: str = ""  # a hash of every file in the set, recorded with each verdict
    _routes: dict[str, tuple[bool, Mapping | None]] = field(default_factory=dict, repr=False)

    ROUTE_CACHE_SIZE = 10_000

    def route(self, topic: str) -> tuple[bool, Mapping | None]:
        """(topic allowed?, the most specific mapping or None); cached, a gateway has few topics."""
        route = self._routes.get(topic)
        if route is None:
            allowed = bool(self.topic_patterns.match(topic))
            best = self.mappings.best(topic) if allowed else None
            route = (allowed, best[1] if best else None)
            if len(self._routes) >= self.ROUTE_CACHE_SIZE:
                self._routes.clear()  # bounded: a client inventing topics cannot grow it
            self._routes[topic] = route
        return route


class _Problems:
    def __init__(self, directory: Path):
        self.directory = directory
        self.items: list[str] = []

    def add(self, file: str, line: int | None, message: str) -> None:
        where = f"{self.directory / file}:{line}" if line else str(self.directory / file)
        self.items.append(f"{where}: {message}")


def load_schema_set(directory: Path) -> SchemaSet:
    """Load and compile a schema set; raises SchemaSetError listing every problem found."""
    directory = Path(directory)
    problems = _Problems(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise SchemaSetError(directory, [f"{directory}: not a directory"])
    if not manifest_path.is_file():
        raise SchemaSetError(directory, [f"{manifest_path}: missing (a schema set needs a {MANIFEST})"])
    try:
        manifest = load_yaml(manifest_path)
    except YamlError as exc:
        raise SchemaSetError(directory, [str(exc)]) from exc
    if not isinstance(manifest, LineDict):
        raise SchemaSetError(directory, [f"{manifest_path}: the top level must be a mapping"])
    schema_set = _build(directory, manifest, problems)
    if problems.items:
        raise SchemaSetError(directory, problems.items)
    assert schema_set is not None
    return schema_set


def _expect(problems: _Problems, value: Any, kind: type, line: int, what: str) -> bool:
    if isinstance(value, kind):
        return True
    expected = {list: "a list", LineDict: "a mapping", str: "a string", bool: "true or false", int: "a whole number"}
    problems.add(MANIFEST, line, f"{what} must be {expected.get(kind, kind.__name__)}, got {value!r}")
    return False


def _build(directory: Path, manifest: LineDict, problems: _Problems) -> SchemaSet | None:
    for key in manifest:
        if key not in TOP_LEVEL_KEYS:
            problems.add(MANIFEST, manifest.line_of(key), f"unknown key {key!r}{did_you_mean(key, TOP_LEVEL_KEYS)} (expected one of {sorted(TOP_LEVEL_KEYS)})")

    patterns: TopicTrie[None] = TopicTrie()
    raw_patterns = manifest.get("topic_patterns", [])
    if _expect(problems, raw_patterns, list, manifest.line_of("topic_patterns"), "topic_patterns"):
        for pattern in raw_patterns:
            try:
                patterns.insert(pattern, None)
            except (ValueError, AttributeError) as exc:
                problems.add(MANIFEST, manifest.line_of("topic_patterns"), f"topic_patterns: bad filter {pattern!r}: {exc}")

    schemas = _load_schemas(directory, manifest, problems)
    rules = _load_rules(manifest, problems)

    mappings: TopicTrie[Mapping] = TopicTrie()
    raw_mappings = manifest.get("schema_mappings", LineDict())
    if _expect(problems, raw_mappings, dict, manifest.line_of("schema_mappings"), "schema_mappings"):
        for topic_filter, target in raw_mappings.items():
            line = raw_mappings.line_of(topic_filter) if isinstance(raw_mappings, LineDict) else manifest.line
            declared = set(manifest.get("schema_files") or {}) if isinstance(manifest.get("schema_files"), dict) else set()
            mapping = _mapping(topic_filter, target, line, schemas, declared, rules.pop(topic_filter, (None, (None, None), line)), problems)
            if mapping is None:
                continue
            if not any(filters_overlap(topic_filter, pattern) for pattern, _ in patterns):
                problems.add(MANIFEST, line, f"schema_mappings: {topic_filter!r} is not covered by topic_patterns, so it can never apply")
            if mapping.dead_letter is not None and (
                loop := loop_problem(mapping.dead_letter, topic_filter, mapping.schema_name, (p for p, _ in patterns))
            ):
                problems.add(MANIFEST, mapping.dead_letter.line or line,
                             f"schema_mappings.{topic_filter}.on_reject.republish.topic: {loop}")
            try:
                mappings.insert(topic_filter, mapping)
            except ValueError as exc:
                problems.add(MANIFEST, line, f"schema_mappings: bad filter {topic_filter!r}: {exc}")
    for topic_filter, (_, _, line) in rules.items():
        problems.add(MANIFEST, line, f"rules: {topic_filter!r} is not a key of schema_mappings")

    policy = manifest.get("policy", LineDict())
    unmapped: Literal["accept", "reject"] = "accept"
    if _expect(problems, policy, dict, manifest.line_of("policy"), "policy"):
        unmapped = policy.get("unmapped", "accept")  # Any from the YAML: checked here
        if unmapped not in ("accept", "reject"):
            problems.add(MANIFEST, policy.line_of("unmapped"), f"policy.unmapped must be accept or reject, got {unmapped!r}")
        for key in policy:
            if key != "unmapped":
                problems.add(MANIFEST, policy.line_of(key), f"policy: unknown key {key!r}{did_you_mean(key, ['unmapped'])}")
    version = manifest.get("version", directory.name)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    if any(schema.format == "sparkplug_b" for schema in schemas.values()):
        from appliance.governance.sparkplug import share_state

        share_state(schemas.values())  # one state for the set: a node's topics may map to several schemas
    return SchemaSet(
        revision=digest.hexdigest()[:12],
        directory=directory,
        version=str(version),
        description=str(manifest.get("description", "")),
        topic_patterns=patterns,
        mappings=mappings,
        schemas=schemas,
        unmapped=unmapped,
    )


def _load_schemas(directory: Path, manifest: LineDict, problems: _Problems) -> dict[str, PayloadSchema]:
    files = manifest.get("schema_files", LineDict())
    if not _expect(problems, files, dict, manifest.line_of("schema_files"), "schema_files"):
        return {}
    schemas: dict[str, PayloadSchema] = {}
    json_specs: list[tuple[str, str, int]] = []
    proto_specs: list[tuple[str, str, str, bool, int]] = []
    avro_specs: list[tuple[str, LineDict]] = []
    for name, spec in files.items():
        line = files.line_of(name)
        if not isinstance(name, str) or not SCHEMA_NAME.match(name):
            problems.add(MANIFEST, line, f"schema_files: bad schema name {name!r} (use name:version, e.g. temperature:v1)")
            continue
        if not _expect(problems, spec, dict, line, f"schema_files.{name}"):
            continue
        for key in spec:
            if key not in FILE_KEYS:
                problems.add(MANIFEST, spec.line_of(key), f"schema_files.{name}: unknown key {key!r}{did_you_mean(key, FILE_KEYS)}")
        compatibility = spec.get("compatibility", "BACKWARD")
        if not isinstance(compatibility, str) or compatibility.upper() not in COMPATIBILITY_MODES:
            problems.add(MANIFEST, spec.line_of("compatibility"),
                         f"schema_files.{name}: compatibility must be one of {sorted(COMPATIBILITY_MODES)}, got {compatibility!r}")
        file, fmt = spec.get("file"), spec.get("format")
        if fmt == "sparkplug_b":
            from appliance.governance.sparkplug_manifest import load_sparkplug

            schema = load_sparkplug(name, spec, lambda line, message: problems.add(MANIFEST, line, message))
            if schema is not None:
                schemas[name] = schema
            continue
        if not isinstance(file, str) or not file:
            problems.add(MANIFEST, line, f"schema_files.{name}: needs `file`")
            continue
        path = (directory / file).resolve()
        if not path.is_relative_to(directory.resolve()):
            problems.add(MANIFEST, spec.line_of("file"), f"schema_files.{name}: {file!r} is outside the schema set")
            continue
        if not path.is_file():
            problems.add(MANIFEST, spec.line_of("file"), f"schema_files.{name}: file {file!r} not found")
            continue
        if fmt in ("jsonschema", "protobuf"):
            for key in sorted(set(spec) & {"encoding", "schema_ids", "writers", "node_metrics", "device_metrics"}):
                problems.add(MANIFEST, spec.line_of(key), f"schema_files.{name}: `{key}` is not for a {fmt} schema")
        if fmt == "jsonschema":
            json_specs.append((name, file, line))
        elif fmt == "protobuf":
            message = spec.get("message")
            if not isinstance(message, str):
                problems.add(MANIFEST, line, f"schema_files.{name}: a protobuf schema needs `message` (e.g. demo.DeviceStatus)")
                continue
            proto_specs.append((name, file, message, bool(spec.get("allow_unknown_fields", False)), line))
        elif fmt == "avro":
            avro_specs.append((name, spec))
        else:
            problems.add(MANIFEST, spec.line_of("format"), f"schema_files.{name}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if json_specs:
        try:
            registry = JsonSchemaRegistry(directory, directory.rglob("*.json"))
        except JsonSchemaFileError as exc:
            problems.add(exc.file, exc.line, exc.args[0])
        else:
            for name, file, line in json_specs:
                try:
                    schemas[name] = registry.compile(name, Path(file).as_posix())
                except JsonSchemaFileError as exc:
                    problems.add(exc.file, exc.line, exc.args[0])
    if proto_specs:
        schemas.update(_load_protobuf(directory, proto_specs, problems))
    if avro_specs:
        from appliance.governance.avro_manifest import load_avro

        schemas.update(load_avro(directory, avro_specs, lambda file, line, message: problems.add(file, line, message)))
    return schemas


def _load_protobuf(directory: Path, specs: list[tuple[str, str, str, bool, int]], problems: _Problems) -> dict[str, PayloadSchema]:
    from appliance.governance.protobuf import ProtobufSchema, ProtoCompileError, compile_protos

    try:
        pool = compile_protos(directory, sorted({file for _, file, _, _, _ in specs}))
    except ProtoCompileError as exc:
        problems.add(exc.file, exc.line, exc.message)
        return {}
    schemas: dict[str, PayloadSchema] = {}
    for name, _file, message, allow_unknown, line in specs:
        try:
            schemas[name] = ProtobufSchema(name, pool, message, allow_unknown_fields=allow_unknown)
        except (ValueError, KeyError) as exc:
            problems.add(MANIFEST, line, f"schema_files.{name}: {exc}")
    return schemas


RuleSpecs = tuple[list[Any], Any, int]


def _load_rules(manifest: LineDict, problems: _Problems) -> dict[str, tuple[Any, Any, int]]:
    """topic filter → (compiled CEL RuleSet or None, (MaxPayloadSize|None, RateLimit|None), line)."""
    raw = manifest.get("rules", LineDict())
    if not _expect(problems, raw, dict, manifest.line_of("rules"), "rules"):
        return {}
    compiled: dict[str, tuple[Any, Any, int]] = {}
    for topic_filter, entries in raw.items():
        line = raw.line_of(topic_filter)
        if not _expect(problems, entries, list, line, f"rules.{topic_filter}"):
            continue
        cel = []
        max_size = rate = None
        for entry in entries:
            if not _expect(problems, entry, dict, line, f"rules.{topic_filter} entry"):
                continue
            name = entry.get("name")
            kinds = [k for k in ("expr", "max_payload_size", "max_rate") if k in entry]
            if not isinstance(name, str) or len(kinds) != 1 or set(entry) - {"name", *kinds}:
                problems.add(MANIFEST, entry.line, f"rules.{topic_filter}: each rule needs `name` and exactly one of expr, max_payload_size, max_rate")
                continue
            kind = kinds[0]
            value = entry[kind]
            if kind == "expr":
                from appliance.governance.rules import RuleError, compile_rule

                try:
                    cel.append(compile_rule(name, str(value)))
                except RuleError as exc:
                    problems.add(MANIFEST, entry.line_of("expr"), f"rules.{topic_filter}: {exc}")
            elif kind == "max_payload_size":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    problems.add(MANIFEST, entry.line_of(kind), f"rules.{topic_filter}.{name}: max_payload_size must be a byte count")
                else:
                    max_size = MaxPayloadSize(name, value)
            else:
                try:
                    rate = RateLimit(name, *parse_rate(str(value)))
                except ValueError as exc:
                    problems.add(MANIFEST, entry.line_of(kind), f"rules.{topic_filter}.{name}: {exc}")
        rule_set = None
        if cel:
            from appliance.governance.rules import RuleSet

            rule_set = RuleSet(cel)
        compiled[topic_filter] = (rule_set, (max_size, rate), line)
    return compiled


def _mapping(
    topic_filter: str,
    target: Any,
    line: int,
    schemas: dict[str, PayloadSchema],
    declared: set[str],
    rules: tuple[Any, Any, int],
    problems: _Problems,
) -> Mapping | None:
    on_reject: Literal["reject", "disconnect"] = "reject"
    dead_letter: DeadLetter | None = None
    forward: Any = True
    forward_qos: Any = None
    if isinstance(target, LineDict):  # what load_yaml makes of a mapping
        for key in target:
            if key not in MAPPING_KEYS:
                problems.add(MANIFEST, target.line_of(key), f"schema_mappings.{topic_filter}: unknown key {key!r}{did_you_mean(key, MAPPING_KEYS)}")
        parsed = parse_on_reject(target.get("on_reject", "reject"), f"schema_mappings.{topic_filter}",
                                 target.line_of("on_reject") if "on_reject" in target else line,
                                 lambda at, message: problems.add(MANIFEST, at, message))
        if parsed is None:
            return None
        on_reject, dead_letter = parsed
        forward = target.get("forward", True)
        forward_qos = target.get("forward_qos")
        if forward_qos not in (None, 0, 1) or isinstance(forward_qos, bool):
            problems.add(MANIFEST, target.line_of("forward_qos"), f"schema_mappings.{topic_filter}: forward_qos must be 0 or 1")
            return None
        target = target.get("schema")
        if not isinstance(forward, bool):
            problems.add(MANIFEST, line, f"schema_mappings.{topic_filter}: forward must be true or false")
            return None
    if target is not None and not isinstance(target, str):
        problems.add(MANIFEST, line, f"schema_mappings.{topic_filter}: expected a schema name, got {target!r}")
        return None
    schema = None
    if target is not None:
        schema = schemas.get(target)
        if schema is None:
            if target not in declared:  # a declared schema that failed to load was reported already
                problems.add(MANIFEST, line, f"schema_mappings.{topic_filter}: schema {target!r} is not in schema_files")
            return None
    rule_set, (max_size, rate), _ = rules
    return Mapping(topic_filter, target, schema, rule_set, max_size, rate, on_reject, forward, forward_qos, dead_letter)


def describe_schema_set(schema_set: SchemaSet) -> str:
    mappings = list(schema_set.mappings)
    rules = sum(1 for _, m in mappings if m.rules is not None or m.max_payload_size or m.rate_limit)
    return (
        f"schema set {schema_set.version} ({schema_set.directory}): ok — {len(schema_set.topic_patterns)} topic patterns, "
        f"{len(mappings)} mappings, {len(schema_set.schemas)} schemas, rules on {rules} mappings, unmapped topics: {schema_set.unmapped}"
    )
