"""JSON Schema pairs with the verdict expected per mode: narrowing breaks BACKWARD, widening FORWARD."""

from __future__ import annotations

from typing import Any

import pytest

from replay.compat import compare_sets
from replay.compat.json_rules import compare_json_schemas
from replay.compat.refs import Documents
from tests.replay.compat.builders import json_set

OBJ = {"type": "object", "properties": {"a": {"type": "string"}}}
CLOSED = {**OBJ, "additionalProperties": False}


def prop(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An object whose property `a` has `schema`."""
    return {"type": "object", "properties": {"a": schema}, **extra}


# (id, old, new, BACKWARD ok?, FORWARD ok?, a finding kind expected)
CASES = [
    ("identical", OBJ, OBJ, True, True, None),
    ("annotations only", {**OBJ, "title": "x"}, {**OBJ, "title": "y", "description": "z"}, True, True, None),
    ("property added, open model", OBJ, {**OBJ, "properties": {**OBJ["properties"], "b": {"type": "integer"}}},
     False, True, "property added to open content model"),
    ("property added, closed model", CLOSED, {**CLOSED, "properties": {**OBJ["properties"], "b": {"type": "integer"}}},
     True, False, "property added to closed content model"),
    ("property removed, closed model", CLOSED, {**CLOSED, "properties": {}}, False, True, "property removed from closed content model"),
    ("property removed, open model", OBJ, {**OBJ, "properties": {}}, True, False, "property removed from open content model"),
    ("closed by unevaluatedProperties", OBJ, {**OBJ, "unevaluatedProperties": False}, False, True, "content model closed"),
    ("content model opened", CLOSED, OBJ, True, False, "content model opened"),
    ("required added", OBJ, {**OBJ, "required": ["a"]}, False, True, "required added"),
    ("required removed", {**OBJ, "required": ["a"]}, OBJ, True, False, "required removed"),
    ("integer widened to number", prop({"type": "integer"}), prop({"type": "number"}), True, False, "type widened"),
    ("number narrowed to integer", prop({"type": "number"}), prop({"type": "integer"}), False, True, "type narrowed"),
    ("null dropped from a type list", prop({"type": ["string", "null"]}), prop({"type": "string"}), False, True, "type narrowed"),
    ("type swapped", prop({"type": "string"}), prop({"type": "boolean"}), False, False, "type changed"),
    ("enum value added", prop({"enum": ["C", "F"]}), prop({"enum": ["C", "F", "K"]}), True, False, "enum values added"),
    ("enum value removed", prop({"enum": ["C", "F"]}), prop({"enum": ["C"]}), False, True, "enum values removed"),
    ("enum 1 and 1.0 are one value", prop({"enum": [1, 2]}), prop({"enum": [1.0, 2]}), True, True, None),
    ("const changed", prop({"const": "v1"}), prop({"const": "v2"}), False, False, "const changed"),
    ("maximum tightened", prop({"type": "number", "maximum": 125}), prop({"type": "number", "maximum": 100}), False, True, "maximum tightened"),
    ("minimum loosened", prop({"type": "number", "minimum": -40}), prop({"type": "number", "minimum": -50}), True, False, "minimum loosened"),
    ("minimum made exclusive", prop({"type": "number", "minimum": 0}), prop({"type": "number", "exclusiveMinimum": 0}),
     False, True, "minimum tightened"),
    ("draft-04 boolean exclusiveMaximum", {"$schema": "http://json-schema.org/draft-04/schema#", **prop({"type": "number", "maximum": 5})},
     {"$schema": "http://json-schema.org/draft-04/schema#", **prop({"type": "number", "maximum": 5, "exclusiveMaximum": True})},
     False, True, "maximum tightened"),
    ("multipleOf 2 to 4", prop({"type": "integer", "multipleOf": 2}), prop({"type": "integer", "multipleOf": 4}), False, True, "multipleOf changed"),
    ("multipleOf 0.5 to 0.25", prop({"type": "number", "multipleOf": 0.5}), prop({"type": "number", "multipleOf": 0.25}),
     True, False, "multipleOf changed"),
    ("numeric keywords on a string are moot", prop({"type": "string"}), prop({"type": "string", "maximum": 3}), True, True, None),
    ("maxLength tightened", prop({"type": "string", "maxLength": 64}), prop({"type": "string", "maxLength": 32}), False, True, "maxLength tightened"),
    ("minLength loosened", prop({"type": "string", "minLength": 2}), prop({"type": "string"}), True, False, "minLength loosened"),
    ("pattern changed", prop({"type": "string", "pattern": "^[a-z]+$"}), prop({"type": "string", "pattern": "^[a-z0-9]+$"}),
     False, False, "pattern changed: cannot prove"),
    ("pattern removed", prop({"type": "string", "pattern": "^t"}), prop({"type": "string"}), True, False, "pattern removed"),
    ("format added", prop({"type": "string"}), prop({"type": "string", "format": "uuid"}), False, True, "format added"),
    ("format changed", prop({"type": "string", "format": "date"}), prop({"type": "string", "format": "date-time"}), False, False, "format changed"),
    ("array items narrowed", prop({"type": "array", "items": {"type": "number"}}), prop({"type": "array", "items": {"type": "integer"}}),
     False, True, "type narrowed"),
    ("minItems raised", prop({"type": "array", "minItems": 1}), prop({"type": "array", "minItems": 2}), False, True, "minItems tightened"),
    ("maxItems dropped", prop({"type": "array", "maxItems": 3}), prop({"type": "array"}), True, False, "maxItems loosened"),
    ("tuple position loosened", prop({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}),
     prop({"type": "array", "prefixItems": [{"type": "number"}], "items": False}), True, False, "type widened"),
    ("oneOf changed", prop({"oneOf": [{"type": "string"}, {"type": "integer"}]}), prop({"oneOf": [{"type": "string"}, {"type": "number"}]}),
     False, False, "oneOf changed: cannot prove"),
    ("anyOf branch added", prop({"anyOf": [{"type": "string"}]}), prop({"anyOf": [{"type": "string"}, {"type": "null"}]}),
     True, False, "anyOf branch added"),
    ("schema became false", prop(True), prop(False), False, True, "schema became false"),
]


@pytest.mark.parametrize(("old", "new", "backward", "forward", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pair(tmp_path, old, new, backward, forward, kind):
    report = compare_sets(json_set(tmp_path, "v1", old), json_set(tmp_path, "v2", new))
    result = report.result("reading")
    assert result.verdicts == {"BACKWARD": backward, "FORWARD": forward, "FULL": backward and forward}, result.findings
    assert result.compatible is backward  # the default mode is BACKWARD
    kinds = [f.kind for f in result.findings if f.breaks]
    if kind is None:
        assert kinds == []
    else:
        assert kind in kinds
    assert result.warnings == ()


def test_nested_objects_are_compared_with_json_pointer_paths(tmp_path):
    def location(maximum):
        return {"type": "object", "properties": {"location": {"type": "object", "properties": {
            "lat/deg": {"type": "number", "maximum": maximum}}}}}

    result = compare_sets(json_set(tmp_path, "v1", location(90)), json_set(tmp_path, "v2", location(91))).result("reading")
    [finding] = result.findings
    assert finding.path == "/properties/location/properties/lat~1deg/maximum"
    assert (finding.old, finding.new, finding.kind) == (90, 91, "maximum loosened")


def test_unproven_findings_say_so(tmp_path):
    old = prop({"type": "string", "pattern": "^a"})
    new = prop({"type": "string", "pattern": "^b"})
    [finding] = compare_sets(json_set(tmp_path, "v1", old), json_set(tmp_path, "v2", new)).result("reading").findings
    assert finding.proven is False and finding.level == "may break"


def test_a_ref_outside_the_documents_is_a_warning_not_a_guess():
    docs = Documents(None)
    docs.add("reading.json", {})
    base = docs.uri_of("reading.json")
    old = prop({"$ref": "units.json#/$defs/unit"})
    new = prop({"$ref": "units.json#/$defs/unit", "maxLength": 3})
    findings, warnings = compare_json_schemas(old, new, old_docs=docs, new_docs=docs, old_base=base, new_base=base)
    assert findings == []
    assert warnings == [
        "could not analyse $ref 'units.json#/$defs/unit' at /properties/a (old schema)",
        "could not analyse $ref 'units.json#/$defs/unit' at /properties/a (new schema)",
    ]


def test_refs_to_anchors_and_recursive_schemas_terminate():
    def tree(max_len):
        return {"$defs": {"node": {"$anchor": "node", "type": "object", "properties": {
            "name": {"type": "string", "maxLength": max_len},
            "children": {"type": "array", "items": {"$ref": "#node"}}}}}, "$ref": "#node"}

    old_docs, new_docs = Documents(None), Documents(None)
    old_docs.add("tree.json", tree(10))
    new_docs.add("tree.json", tree(5))
    base = old_docs.uri_of("tree.json")
    findings, warnings = compare_json_schemas(tree(10), tree(5), old_docs=old_docs, new_docs=new_docs, old_base=base, new_base=base)
    assert warnings == []
    # The recursion stops where the pair of targets is already being compared.
    assert [(f.kind, f.path) for f in findings] == [("maxLength tightened", "/properties/name/maxLength")]
