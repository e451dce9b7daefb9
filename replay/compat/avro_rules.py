"""Avro compatibility by Avro's own schema-resolution rules (the specification's "Schema
Resolution"; fastavro applies the same rules when it reads with a writer and a reader schema).

`resolution_problems(writer, reader)` lists why data written with `writer` cannot be read with
`reader`: a type that neither matches nor promotes (int → long → float → double, string ↔ bytes), a
record or enum or fixed whose name differs (unqualified, or one of the reader's aliases), a fixed
whose size differs, a reader field that has no default and no writer field (by name or alias), writer
enum symbols the reader lacks (without an enum default), writer union branches the reader cannot
take. One promotion Avro allows is data-dependent here: bytes read as string fail unless they are
UTF-8, so it counts as "may break". BACKWARD asks the new schema to read the old one's data, FORWARD the old schema the new one's.

How the appliance reads a payload adds to that (`compare_avro`):

- `encoding: binary` carries no writer schema: the appliance decodes every payload with the mapped
  schema, so Avro's resolution never happens on the way in. Any change to the binary layout (a field
  added, even with a default) makes payloads of one version fail under the other: both directions
  break. Use `confluent` or `single_object` for schemas that evolve.
- `confluent` and `single_object` name the writer's schema: the set accepts every writer schema the
  entry lists (`schema_ids`, or the entry's file and `writers`) and resolves it into the entry's
  schema. BACKWARD then needs every writer the old set took to be listed and readable in the new set;
  FORWARD the reverse. A Confluent schema id that names another writer schema (by canonical form) in
  the other set breaks: payloads framed with it are decoded with the wrong writer.
"""

from __future__ import annotations

from typing import Any

from appliance.governance.avro import fingerprint
from replay.compat.model import BOTH, NARROWING, NEITHER, WIDENING, Direction, Finding

_PROMOTIONS = {("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"), ("long", "double"),
               ("float", "double"), ("string", "bytes"), ("bytes", "string")}
_NAMED = {"record", "error", "enum", "fixed"}
BYTES_AS_STRING = "bytes read as string"  # allowed by Avro, fails on bytes that are not UTF-8


def _named(parsed: Any) -> dict[str, Any]:
    return parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}


def _deref(schema: Any, named: dict[str, Any]) -> Any:
    while isinstance(schema, str) and schema in named:
        schema = named[schema]
    return schema


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, str):
        return schema
    kind = schema.get("type")
    return kind if isinstance(kind, str) else _kind(kind)


def _label(schema: Any) -> str:
    kind = _kind(schema)
    if kind in _NAMED and isinstance(schema, dict):
        return f"{kind} {schema.get('name')}"
    if kind == "array" and isinstance(schema, dict):
        return f"array of {_label(schema['items'])}"
    if kind == "map" and isinstance(schema, dict):
        return f"map of {_label(schema['values'])}"
    if kind == "union":
        return "[" + ", ".join(_label(b) for b in schema) + "]"
    return kind


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Resolver:
    def __init__(self, writer: Any, reader: Any):
        self.wn, self.rn = _named(writer), _named(reader)
        self.problems: list[tuple[str, str, Any, Any, str]] = []
        self._seen: set[tuple[int, int]] = set()

    def problem(self, kind: str, path: str, old: Any, new: Any, detail: str = "") -> None:
        self.problems.append((kind, path or "/", old, new, detail))

    def names_match(self, w: dict[str, Any], r: dict[str, Any]) -> bool:
        aliases = r.get("aliases", []) or []
        return _short(w["name"]) == _short(r["name"]) or w["name"] in aliases or _short(w["name"]) in aliases

    def shallow(self, w: Any, r: Any) -> bool:
        """Whether reader branch `r` is the one Avro picks for writer type `w` (first match)."""
        w, r = _deref(w, self.wn), _deref(r, self.rn)
        wk, rk = _kind(w), _kind(r)
        if wk == "union" or rk == "union":
            return True
        if wk == rk:
            if wk in _NAMED:
                return self.names_match(w, r) and (wk != "fixed" or w.get("size") == r.get("size"))
            return True
        return (wk, rk) in _PROMOTIONS

    def resolve(self, w: Any, r: Any, path: str) -> None:
        w, r = _deref(w, self.wn), _deref(r, self.rn)
        key = (id(w), id(r))
        if key in self._seen:
            return  # a recursive type: already being resolved
        self._seen.add(key)
        wk, rk = _kind(w), _kind(r)
        if wk == "union":
            for branch in w:
                self.resolve(branch, r, path)
            return
        if rk == "union":
            for branch in r:
                if self.shallow(w, branch):
                    self.resolve(w, branch, path)
                    return
            self.problem("type not in the reader's union", path, _label(w), _label(r),
                         f"a {_label(w)} value has no branch to go to")
            return
        if not self.shallow(w, r):
            if wk in _NAMED and wk == rk:
                what = "size" if wk == "fixed" and self.names_match(w, r) else "name"
                old = w.get("size") if what == "size" else w.get("name")
                new = r.get("size") if what == "size" else r.get("name")
                self.problem(f"{wk} {what} changed", path, old, new,
                             "names match unqualified or through the reader's aliases")
            else:
                self.problem("type changed", path, _label(w), _label(r), "neither the same type nor a promotion")
            return
        if (wk, rk) == ("bytes", "string"):
            self.problem(BYTES_AS_STRING, path, "bytes", "string",
                         "Avro allows the promotion, but bytes that are not UTF-8 fail to read (may break)")
        elif wk in ("record", "error"):
            self.record(w, r, path)
        elif wk == "enum":
            missing = [s for s in w.get("symbols", []) if s not in r.get("symbols", [])]
            if missing and r.get("default") is None:
                self.problem("enum symbols missing", path, missing, r.get("symbols"),
                             "a value with one of these symbols cannot be read (the reader's enum has no default)")
        elif wk == "array":
            self.resolve(w["items"], r["items"], f"{path}/[]")
        elif wk == "map":
            self.resolve(w["values"], r["values"], f"{path}/{{}}")

    def record(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        writer_fields = {f["name"]: f for f in w.get("fields", [])}
        for field in r.get("fields", []):
            found = writer_fields.get(field["name"])
            if found is None:
                found = next((writer_fields[a] for a in field.get("aliases", []) or [] if a in writer_fields), None)
            where = f"{path}/{field['name']}"
            if found is not None:
                self.resolve(found["type"], field["type"], where)
            elif "default" not in field:
                self.problem("reader field without default", where, None, _label(field["type"]),
                             "the writer has no such field and the reader no default for it")


def resolution_problems(writer: Any, reader: Any) -> list[tuple[str, str, Any, Any, str]]:
    """(kind, path, writer side, reader side, detail) for each reason `writer` data is not readable."""
    resolver = _Resolver(writer, reader)
    resolver.resolve(writer, reader, "")
    return resolver.problems


def readable(writer: Any, reader: Any) -> bool:
    return not resolution_problems(writer, reader)


def schema_findings(old: Any, new: Any) -> list[Finding]:
    """Old and new schema judged as Schema Registry does: the new one reading the old one's data
    (BACKWARD) and the old one reading the new one's (FORWARD)."""
    findings = []
    for kind, path, w, r, detail in resolution_problems(old, new):
        findings.append(Finding(kind, path, w, r, NARROWING, proven=kind != BYTES_AS_STRING,
                                detail=f"data written with the old schema cannot be read with the new one: {detail}"))
    for kind, path, w, r, detail in resolution_problems(new, old):
        findings.append(Finding(kind, path, r, w, WIDENING, proven=kind != BYTES_AS_STRING,
                                detail=f"data written with the new schema cannot be read with the old one: {detail}"))
    return findings


def layout(schema: Any, named: dict[str, Any] | None = None, seen: frozenset[str] = frozenset()) -> Any:
    """The binary layout of a schema: what decoding without a writer schema depends on."""
    named = _named(schema) if named is None else named
    if isinstance(schema, str) and schema in named:
        if schema in seen:
            return ("ref", _short(schema))
        return layout(named[schema], named, seen | {schema})
    kind = _kind(schema)
    if kind == "union":
        return ("union", tuple(layout(b, named, seen) for b in schema))
    if kind in ("record", "error"):
        name = schema["name"]
        return ("record", tuple(layout(f["type"], named, seen | {name}) for f in schema.get("fields", [])))
    if kind == "enum":
        return ("enum", len(schema.get("symbols", [])))
    if kind == "fixed":
        return ("fixed", schema.get("size"))
    if kind == "array":
        return ("array", layout(schema["items"], named, seen))
    if kind == "map":
        return ("map", layout(schema["values"], named, seen))
    return kind


def compare_avro(old: Any, new: Any) -> list[Finding]:
    """Findings for two `AvroSchema`s (the appliance's): resolution, then how each is read."""
    findings: list[Finding] = []
    if old.encoding != new.encoding:
        findings.append(Finding("encoding changed", "/", old.encoding, new.encoding, BOTH,
                                detail="a payload framed for one encoding is not valid in the other"))
        return findings
    if old.encoding == "binary":
        findings.extend(schema_findings(old.parsed, new.parsed))
        if layout(old.parsed) != layout(new.parsed):
            findings.append(Finding(
                "binary layout changed", "/", old.file, new.file, BOTH,
                detail="encoding binary carries no writer schema: the appliance decodes every payload with the mapped "
                       "schema, so payloads of one version fail under the other (use encoding confluent or single_object "
                       "to evolve a schema)"))
        return findings
    old_writers, new_writers = _writers(old), _writers(new)
    _writer_side(findings, old_writers, new_writers, new.parsed, Direction.BACKWARD)
    _writer_side(findings, new_writers, old_writers, old.parsed, Direction.FORWARD)
    if not findings and old.parsed is not None and new.parsed is not None:
        # The readers themselves, for the record: notes only when every writer is fine.
        for finding in schema_findings(old.parsed, new.parsed):
            findings.append(Finding(finding.kind, finding.path, finding.old, finding.new, NEITHER,
                                    detail=f"{finding.detail} (no listed writer schema is affected)"))
    return findings


def _writers(schema: Any) -> dict[Any, tuple[str, Any]]:
    """key (schema id, or fingerprint) -> (label, parsed writer schema)."""
    if schema.encoding == "confluent":
        return {number: (writer.label, writer.schema) for number, writer in schema._ids.items()}
    return {fp: (writer.label, writer.schema) for fp, writer in schema._fingerprints.items()}


def _writer_side(findings: list[Finding], before: dict[Any, tuple[str, Any]], after: dict[Any, tuple[str, Any]],
                 reader: Any, direction: Direction) -> None:
    breaks = frozenset({direction})
    which = "new" if direction is Direction.BACKWARD else "old"
    for key, (label, writer) in sorted(before.items(), key=lambda item: str(item[0])):
        if key not in after:
            what = f"schema id {key}" if isinstance(key, int) else f"writer schema {label} (fingerprint {key.hex()})"
            findings.append(Finding("writer schema not accepted", f"/{label}", label, None, breaks,
                                    detail=f"{what} is not listed in the {which} set: payloads written with it are rejected"))
            continue
        after_label, after_writer = after[key]
        if isinstance(key, int) and fingerprint(writer) != fingerprint(after_writer):
            # The id names another writer schema now: a payload framed with it is decoded with the
            # other set's writer, whatever resolution would say about the two readers.
            findings.append(Finding("schema id remapped", f"/{label}", label, after_label, breaks,
                                    detail=f"schema id {key} maps to another writer schema in the {which} set ({after_label}): "
                                           f"payloads written with {label} are decoded with the wrong schema"))
            label, writer = after_label, after_writer  # what that id is read with from now on
        for kind, path, w, r, detail in resolution_problems(writer, reader):
            findings.append(Finding(kind, f"/{label}{path if path != '/' else ''}", w, r, breaks, proven=kind != BYTES_AS_STRING,
                                    detail=f"a record written with {label} cannot be read with the {which} schema: {detail}"))
