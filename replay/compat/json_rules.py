"""JSON Schema compatibility: which messages an old and a new schema accept, compared keyword by keyword.

A change that makes the schema accept less (a new `required`, a tighter `maximum`, a closed content
model) *narrows* it: a message valid under the old schema may be rejected by the new one, which
breaks BACKWARD. A change that makes it accept more *widens* it and breaks FORWARD. Some changes do
both (`const` changed, a type swapped) and some cannot be judged statically (`pattern` changed, a
`oneOf` changed): those are findings with `proven=False`, counted as breaking.

Paths are JSON pointers along the keywords of the schema (`/properties/location/properties/lat`),
with `$ref`s followed transparently. Annotations (`title`, `description`, `default`, `examples`,
...) never matter.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any
from urllib.parse import urldefrag, urljoin

from replay.compat.model import BOTH, NARROWING, WIDENING, Direction, Finding
from replay.compat.refs import Documents

ANNOTATIONS = frozenset({
    "title", "description", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly",
    "$schema", "$id", "$anchor", "$dynamicAnchor", "$defs", "definitions", "$vocabulary",
    "contentMediaType", "contentEncoding", "contentSchema",
})
HANDLED = frozenset({
    "$ref", "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minLength", "maxLength", "pattern", "format", "properties", "required",
    "additionalProperties", "unevaluatedProperties", "patternProperties", "minProperties",
    "maxProperties", "items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems",
    "allOf", "anyOf",
})
# Keywords whose effect on the accepted set is not monotone or not worth modelling: any change is
# reported as "cannot prove" in both directions.
OPAQUE = frozenset({
    "oneOf", "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
    "propertyNames", "contains", "minContains", "maxContains", "unevaluatedItems",
    "$dynamicRef", "$recursiveRef",
})
ALL_TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})
MAX_DEPTH = 64


def compare_json_schemas(
    old: Any, new: Any, *, old_docs: Documents, new_docs: Documents, old_base: str, new_base: str
) -> tuple[list[Finding], list[str]]:
    """Findings and warnings ("could not analyse $ref X") for an old and a new schema document."""
    diff = _Diff(old_docs, new_docs, _legacy_refs(old), _legacy_refs(new))
    diff._active.add((old_base + "#", new_base + "#"))  # a `$ref: "#"` below leads back here
    diff.compare(old, old_base, new, new_base, "", 0)
    return diff.findings, diff.warnings


def _legacy_refs(document: Any) -> bool:
    """Drafts 4 to 7 ignore the keywords beside a `$ref`; 2019-09 and later apply both."""
    draft = document.get("$schema", "") if isinstance(document, dict) else ""
    return isinstance(draft, str) and any(f"draft-0{n}" in draft for n in (4, 6, 7))


def _canonical(value: Any) -> str:
    """A JSON value as text where equal values are equal strings (1 and 1.0 alike, true not 1)."""

    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return ["#num", str(Fraction(str(v)))] if isinstance(v, float) else ["#num", str(v)]
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return repr(v)

    return json.dumps(norm(value), sort_keys=True)


def _fraction(value: Any) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


class _Diff:
    def __init__(self, old_docs: Documents, new_docs: Documents, old_legacy: bool, new_legacy: bool):
        self.docs = (old_docs, new_docs)
        self.legacy = (old_legacy, new_legacy)
        self.findings: list[Finding] = []
        self.warnings: list[str] = []
        self._active: set[tuple[str, str]] = set()

    def add(self, kind: str, path: str, old: Any, new: Any, breaks: frozenset[Direction], *, proven: bool = True, detail: str = "") -> None:
        self.findings.append(Finding(kind, path or "/", old, new, breaks, proven, detail))

    # --- $ref ------------------------------------------------------------------------------------

    def _deref(self, schema: Any, base: str, side: int, path: str) -> tuple[Any, str, str] | None:
        """The schema with its `$ref`s followed: (schema, base URI, key of the last target) or None
        when a reference cannot be followed (a warning says which)."""
        key = ""
        for _ in range(32):
            if not isinstance(schema, dict):
                return schema, base, key
            if isinstance(schema.get("$id"), str):
                base = _join(base, schema["$id"])
            if "$ref" not in schema:
                return schema, base, key
            ref = schema["$ref"]
            target = self.docs[side].resolve(base, ref)
            if target is None:
                self.warnings.append(f"could not analyse $ref {ref!r} at {path or '/'} ({'old' if side == 0 else 'new'} schema)")
                return None
            resolved, target_base, key = target
            siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in ANNOTATIONS}
            if siblings and not self.legacy[side]:
                if not isinstance(resolved, dict) or set(siblings) & (set(resolved) - ANNOTATIONS) or (
                    target_base != base and "$ref" in json.dumps(siblings)
                ):
                    self.warnings.append(
                        f"could not analyse $ref {ref!r} at {path or '/'}: keywords beside it overlap its target"
                    )
                    return None
                resolved = {**resolved, **siblings}
            schema, base = resolved, target_base
        self.warnings.append(f"could not analyse $ref at {path or '/'}: more than 32 references in a chain")
        return None

    # --- the walk --------------------------------------------------------------------------------

    def compare(self, old: Any, old_base: str, new: Any, new_base: str, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.warnings.append(f"could not analyse {path}: nested deeper than {MAX_DEPTH} levels")
            return
        if _canonical(old) == _canonical(new) and not _has_ref(old):
            return  # identical and self-contained: nothing can differ below
        old_resolved = self._deref(old, old_base, 0, path)
        new_resolved = self._deref(new, new_base, 1, path)
        if old_resolved is None or new_resolved is None:
            return
        old, old_base, old_key = old_resolved
        new, new_base, new_key = new_resolved
        if old_key or new_key:
            pair = (old_key, new_key)
            if pair in self._active:  # a recursive schema: this pair is being compared further up
                return
            self._active.add(pair)
            try:
                self._compare_schemas(old, old_base, new, new_base, path, depth)
            finally:
                self._active.discard(pair)
        else:
            self._compare_schemas(old, old_base, new, new_base, path, depth)

    def _compare_schemas(self, old: Any, old_base: str, new: Any, new_base: str, path: str, depth: int) -> None:
        old, new = _as_schema(old), _as_schema(new)
        if old is None or new is None:
            self.add("not a schema", path, old, new, BOTH, proven=False)
            return
        if old is False or new is False:
            if old is False and new is not False:
                self.add("schema no longer false", path, False, new, WIDENING, detail="it accepted nothing before")
            elif new is False and old is not False:
                self.add("schema became false", path, old, False, NARROWING, detail="it accepts nothing now")
            return
        old_types, new_types = _types(old), _types(new)
        self._type(old_types, new_types, path)
        self._values(old, new, path)
        either = (old_types or ALL_TYPES) | (new_types or ALL_TYPES)
        if either & {"number", "integer"}:
            self._numbers(old, new, path)
        if "string" in either:
            self._strings(old, new, path)
        if "object" in either:
            self._objects(old, old_base, new, new_base, path, depth)
        if "array" in either:
            self._arrays(old, old_base, new, new_base, path, depth)
        for keyword in ("allOf", "anyOf"):
            self._composition(keyword, old, old_base, new, new_base, path, depth)
        for keyword in sorted(OPAQUE):
            if (keyword in old or keyword in new) and _canonical(old.get(keyword)) != _canonical(new.get(keyword)):
                self.add(f"{keyword} changed: cannot prove", f"{path}/{keyword}", old.get(keyword), new.get(keyword), BOTH, proven=False)
        for keyword in sorted((set(old) | set(new)) - ANNOTATIONS - HANDLED - OPAQUE):
            if _canonical(old.get(keyword)) != _canonical(new.get(keyword)):
                self.add("unknown keyword changed", f"{path}/{keyword}", old.get(keyword), new.get(keyword), frozenset(),
                         detail="validators ignore keywords they do not know")

    def _type(self, old: frozenset[str] | None, new: frozenset[str] | None, path: str) -> None:
        lost = [t for t in sorted(old or ALL_TYPES) if not _covers(new, t)]
        gained = [t for t in sorted(new or ALL_TYPES) if not _covers(old, t)]
        # "integer" -> "number" gains only the non-integral numbers; say so precisely.
        shown_old = sorted(old) if old is not None else None
        shown_new = sorted(new) if new is not None else None
        if lost and gained:
            self.add("type changed", f"{path}/type", shown_old, shown_new, BOTH)
        elif lost:
            self.add("type narrowed", f"{path}/type", shown_old, shown_new, NARROWING, detail=f"no longer accepts {', '.join(lost)}")
        elif gained:
            self.add("type widened", f"{path}/type", shown_old, shown_new, WIDENING, detail=f"now accepts {', '.join(gained)}")

    def _values(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        if "const" in old and "const" in new and "enum" not in old and "enum" not in new:
            if _canonical(old["const"]) != _canonical(new["const"]):
                self.add("const changed", f"{path}/const", old["const"], new["const"], BOTH)
            return
        old_values, new_values = _allowed_values(old), _allowed_values(new)
        where = f"{path}/const" if ("const" in old or "const" in new) and "enum" not in new else f"{path}/enum"
        if old_values is None and new_values is None:
            return
        if old_values is None:
            assert new_values is not None
            self.add("enum added" if "enum" in new else "const added", where, None, list(new_values.values()), NARROWING)
            return
        if new_values is None:
            self.add("enum removed" if "enum" in old else "const removed", where, list(old_values.values()), None, WIDENING)
            return
        removed = [v for k, v in old_values.items() if k not in new_values]
        added = [v for k, v in new_values.items() if k not in old_values]
        if removed:
            self.add("enum values removed", where, removed, None, NARROWING)
        if added:
            self.add("enum values added", where, None, added, WIDENING)

    def _numbers(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        for side, (keyword, exclusive_keyword) in (("lower", ("minimum", "exclusiveMinimum")), ("upper", ("maximum", "exclusiveMaximum"))):
            old_bound, new_bound = _bound(old, keyword, exclusive_keyword), _bound(new, keyword, exclusive_keyword)
            if old_bound == new_bound:
                continue
            tighter = _tighter(new_bound, old_bound, upper=side == "upper")
            looser = _tighter(old_bound, new_bound, upper=side == "upper")
            shown = (_show_bound(old_bound), _show_bound(new_bound))
            where = f"{path}/{keyword}"
            if tighter:
                self.add(f"{keyword} tightened", where, *shown, NARROWING)
            elif looser:
                self.add(f"{keyword} loosened", where, *shown, WIDENING)
        old_step, new_step = _fraction(old.get("multipleOf")), _fraction(new.get("multipleOf"))
        if old_step != new_step:
            where = f"{path}/multipleOf"
            # Every multiple of a is a multiple of b exactly when a / b is a whole number.
            narrows = new_step is not None and (old_step is None or (old_step / new_step).denominator != 1)
            widens = old_step is not None and (new_step is None or (new_step / old_step).denominator != 1)
            breaks = (NARROWING if narrows else frozenset()) | (WIDENING if widens else frozenset())
            if breaks:
                self.add("multipleOf changed", where, old.get("multipleOf"), new.get("multipleOf"), breaks)

    def _strings(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        self._count_bounds(old, new, path, "minLength", "maxLength")
        old_pattern, new_pattern = old.get("pattern"), new.get("pattern")
        if old_pattern != new_pattern:
            where = f"{path}/pattern"
            if old_pattern is None:
                self.add("pattern added", where, None, new_pattern, NARROWING)
            elif new_pattern is None:
                self.add("pattern removed", where, old_pattern, None, WIDENING)
            else:
                self.add("pattern changed: cannot prove", where, old_pattern, new_pattern, BOTH, proven=False,
                         detail="comparing the languages of two regular expressions is not attempted")
        old_format, new_format = old.get("format"), new.get("format")
        if old_format != new_format:
            where = f"{path}/format"
            # The appliance always checks `format` (docs/schemas.md), so it is an assertion here.
            if old_format is None:
                self.add("format added", where, None, new_format, NARROWING)
            elif new_format is None:
                self.add("format removed", where, old_format, None, WIDENING)
            else:
                self.add("format changed", where, old_format, new_format, BOTH)

    def _count_bounds(self, old: dict[str, Any], new: dict[str, Any], path: str, low: str, high: str) -> None:
        for keyword, upper in ((low, False), (high, True)):
            old_value, new_value = old.get(keyword), new.get(keyword)
            if old_value == new_value:
                continue
            where = f"{path}/{keyword}"
            old_n = old_value if isinstance(old_value, int) else (None if upper else 0)
            new_n = new_value if isinstance(new_value, int) else (None if upper else 0)
            if old_n == new_n:
                continue
            if upper:
                tighter = new_n is not None and (old_n is None or new_n < old_n)
            else:
                tighter = new_n is not None and (old_n is None or new_n > old_n)
            if tighter:
                self.add(f"{keyword} tightened", where, old_value, new_value, NARROWING)
            else:
                self.add(f"{keyword} loosened", where, old_value, new_value, WIDENING)

    def _objects(self, old: dict[str, Any], old_base: str, new: dict[str, Any], new_base: str, path: str, depth: int) -> None:
        old_props, new_props = _dict(old.get("properties")), _dict(new.get("properties"))
        for name in sorted(set(old_props) | set(new_props)):
            where = f"{path}/properties/{_escape(name)}"
            if name in old_props and name in new_props:
                self.compare(old_props[name], old_base, new_props[name], new_base, where, depth + 1)
            elif name in new_props:
                self._property_added(old, old_base, new_props[name], new_base, name, where, depth)
            else:
                self._property_removed(old_props[name], old_base, new, new_base, name, where, depth)
        old_extra, new_extra = _extra(old), _extra(new)
        if _canonical(old_extra) != _canonical(new_extra):
            where = f"{path}/additionalProperties"
            if new_extra is False:
                self.add("content model closed", where, old_extra, False, NARROWING, detail="properties not listed are now rejected")
            elif old_extra is False:
                self.add("content model opened", where, False, new_extra, WIDENING, detail="properties not listed are now accepted")
            else:
                self.compare(old_extra, old_base, new_extra, new_base, where, depth + 1)
        if _canonical(old.get("patternProperties")) != _canonical(new.get("patternProperties")):
            self.add("patternProperties changed: cannot prove", f"{path}/patternProperties",
                     old.get("patternProperties"), new.get("patternProperties"), BOTH, proven=False)
        old_required, new_required = _names(old.get("required")), _names(new.get("required"))
        if added := sorted(new_required - old_required):
            self.add("required added", f"{path}/required", sorted(old_required), sorted(new_required), NARROWING,
                     detail=f"messages without {', '.join(added)} are now rejected")
        if removed := sorted(old_required - new_required):
            self.add("required removed", f"{path}/required", sorted(old_required), sorted(new_required), WIDENING,
                     detail=f"messages without {', '.join(removed)} are now accepted")
        self._count_bounds(old, new, path, "minProperties", "maxProperties")

    def _property_added(self, old: dict[str, Any], old_base: str, schema: Any, new_base: str, name: str, where: str, depth: int) -> None:
        before = _extra(old)
        if _as_schema(schema) is False:
            if before is not False:
                self.add("property forbidden", where, before, False, NARROWING)
            return
        if before is False:
            self.add("property added to closed content model", where, None, schema, WIDENING,
                     detail=f"the old schema rejects messages with {name!r} (additionalProperties: false)")
        elif before is True:
            if not _trivially_true(schema):
                self.add("property added to open content model", where, None, schema, NARROWING,
                         detail=f"old messages could carry {name!r} with any value; the new schema constrains it")
        else:
            self.compare(before, old_base, schema, new_base, where, depth + 1)

    def _property_removed(self, schema: Any, old_base: str, new: dict[str, Any], new_base: str, name: str, where: str, depth: int) -> None:
        after = _extra(new)
        if _as_schema(schema) is False:
            if after is not False:
                self.add("property no longer forbidden", where, False, after, WIDENING)
            return
        if after is False:
            self.add("property removed from closed content model", where, schema, None, NARROWING,
                     detail=f"the new schema rejects messages with {name!r} (additionalProperties: false)")
        elif after is True:
            if not _trivially_true(schema):
                self.add("property removed from open content model", where, schema, None, WIDENING,
                         detail=f"{name!r} is no longer constrained: the old schema rejects values the new one accepts")
        else:
            self.compare(schema, old_base, after, new_base, where, depth + 1)

    def _arrays(self, old: dict[str, Any], old_base: str, new: dict[str, Any], new_base: str, path: str, depth: int) -> None:
        old_prefix, old_rest = _tuple_items(old)
        new_prefix, new_rest = _tuple_items(new)
        prefix_keyword = "prefixItems" if "prefixItems" in new or "prefixItems" in old else "items"
        for index in range(max(len(old_prefix), len(new_prefix))):
            o = old_prefix[index] if index < len(old_prefix) else old_rest
            n = new_prefix[index] if index < len(new_prefix) else new_rest
            self.compare(o, old_base, n, new_base, f"{path}/{prefix_keyword}/{index}", depth + 1)
        rest_keyword = "additionalItems" if "additionalItems" in new or "additionalItems" in old else "items"
        self.compare(old_rest, old_base, new_rest, new_base, f"{path}/{rest_keyword}", depth + 1)
        self._count_bounds(old, new, path, "minItems", "maxItems")
        if bool(old.get("uniqueItems")) != bool(new.get("uniqueItems")):
            if new.get("uniqueItems"):
                self.add("uniqueItems added", f"{path}/uniqueItems", old.get("uniqueItems"), True, NARROWING)
            else:
                self.add("uniqueItems removed", f"{path}/uniqueItems", True, new.get("uniqueItems"), WIDENING)

    def _composition(self, keyword: str, old: dict[str, Any], old_base: str, new: dict[str, Any], new_base: str, path: str, depth: int) -> None:
        """allOf / anyOf: identical branches pair up, the rest pair in order; findings inside a branch
        are unproven (another branch may make up for them)."""
        old_branches, new_branches = _list(old.get(keyword)), _list(new.get(keyword))
        if _canonical(old_branches) == _canonical(new_branches) and not _has_ref(old_branches):
            return
        unmatched_new = list(range(len(new_branches)))
        leftover_old = []
        for i, branch in enumerate(old_branches):
            same = next((j for j in unmatched_new if _canonical(new_branches[j]) == _canonical(branch)), None)
            if same is None or _has_ref(branch):
                leftover_old.append(i)
            else:
                unmatched_new.remove(same)
        before = len(self.findings)
        for i, j in zip(leftover_old, unmatched_new):
            self.compare(old_branches[i], old_base, new_branches[j], new_base, f"{path}/{keyword}/{j}", depth + 1)
        for k in range(before, len(self.findings)):
            f = self.findings[k]
            if f.breaks:
                self.findings[k] = Finding(f.kind, f.path, f.old, f.new, f.breaks, False, f"inside {keyword}; " + f.detail)
        # An extra allOf branch narrows, an extra anyOf branch widens (unless another covers it).
        extra_new, extra_old = unmatched_new[len(leftover_old):], leftover_old[len(unmatched_new):]
        adds, drops = (NARROWING, WIDENING) if keyword == "allOf" else (WIDENING, NARROWING)
        for j in extra_new:
            self.add(f"{keyword} branch added", f"{path}/{keyword}/{j}", None, new_branches[j], adds, proven=False)
        for i in extra_old:
            self.add(f"{keyword} branch removed", f"{path}/{keyword}/{i}", old_branches[i], None, drops, proven=False)


# --- normalising keywords -------------------------------------------------------------------------


def _join(base: str, ref: str) -> str:
    return urldefrag(urljoin(base, ref)).url


def _as_schema(schema: Any) -> dict[str, Any] | bool | None:
    """True and {} accept everything, False nothing; None: not a schema at all."""
    if schema is True:
        return {}
    if schema is False:
        return False
    if isinstance(schema, dict):
        return schema
    return None


def _trivially_true(schema: Any) -> bool:
    s = _as_schema(schema)
    return isinstance(s, dict) and not (set(s) - ANNOTATIONS)


def _types(schema: dict[str, Any]) -> frozenset[str] | None:
    value = schema.get("type")
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return None


def _covers(types: frozenset[str] | None, wanted: str) -> bool:
    if types is None:
        return True
    return wanted in types or (wanted == "integer" and "number" in types)


def _allowed_values(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The values `enum` and `const` allow, by canonical form; None when unrestricted."""
    allowed: dict[str, Any] | None = None
    if isinstance(schema.get("enum"), list):
        allowed = {_canonical(v): v for v in schema["enum"]}
    if "const" in schema:
        key = _canonical(schema["const"])
        allowed = {key: schema["const"]} if allowed is None or key in allowed else {}
    return allowed


Bound = tuple[Fraction, bool] | None  # (value, exclusive)


def _bound(schema: dict[str, Any], keyword: str, exclusive_keyword: str) -> Bound:
    candidates: list[tuple[Fraction, bool]] = []
    inclusive = _fraction(schema.get(keyword))
    if inclusive is not None:
        candidates.append((inclusive, schema.get(exclusive_keyword) is True))  # draft 4: a boolean
    exclusive = _fraction(schema.get(exclusive_keyword))
    if exclusive is not None:
        candidates.append((exclusive, True))
    if not candidates:
        return None
    upper = keyword == "maximum"
    best = candidates[0]
    for candidate in candidates[1:]:
        if _tighter(candidate, best, upper=upper):
            best = candidate
    return best


def _tighter(a: Bound, b: Bound, *, upper: bool) -> bool:
    """Does bound a exclude some value that bound b allows?"""
    if a is None:
        return False
    if b is None:
        return True
    if a[0] != b[0]:
        return a[0] < b[0] if upper else a[0] > b[0]
    return a[1] and not b[1]


def _show_bound(bound: Bound) -> Any:
    if bound is None:
        return None
    value = int(bound[0]) if bound[0].denominator == 1 else float(bound[0])
    return {"exclusive": value} if bound[1] else value


def _extra(schema: dict[str, Any]) -> Any:
    """The schema for properties `properties` does not list: additionalProperties, else a false
    unevaluatedProperties (exact when no allOf/$ref brings more properties in), else true."""
    if "additionalProperties" in schema:
        extra = schema["additionalProperties"]
    else:
        extra = schema.get("unevaluatedProperties", True)
    return True if extra is not False and _trivially_true(extra) else extra


def _tuple_items(schema: dict[str, Any]) -> tuple[list[Any], Any]:
    """(schemas by position, the schema for the remaining items)."""
    if isinstance(schema.get("prefixItems"), list):
        return list(schema["prefixItems"]), schema.get("items", True)
    if isinstance(schema.get("items"), list):
        return list(schema["items"]), schema.get("additionalItems", True)
    return [], schema.get("items", True)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _names(value: Any) -> set[str]:
    return {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()


def _has_ref(value: Any) -> bool:
    return '"$ref"' in json.dumps(value)


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")
