"""Where messages are accepted at all: topic patterns, schema mappings and the unmapped policy.

A topic pattern removed (and not covered by another) means topics newly rejected: old traffic that
passed is refused, which breaks BACKWARD; a pattern added breaks FORWARD. A mapping added puts
topics that were accepted unvalidated (policy `unmapped: accept`) under a schema: that narrows.
"""

from __future__ import annotations

from appliance.governance.schemaset import Mapping, SchemaSet
from replay.compat.model import NARROWING, NEITHER, WIDENING, Finding


def covers(wide: str, narrow: str) -> bool:
    """Does every topic that matches filter `narrow` also match filter `wide`? (MQTT semantics:
    `+` one level, `#` the parent level and everything below, no first-level wildcard for `$` topics.)"""
    a, b = wide.split("/"), narrow.split("/")
    system = b[0].startswith("$")
    for i in range(max(len(a), len(b)) + 1):
        if i < len(a) and a[i] == "#":
            return not (i == 0 and system)
        if i == len(a) and i == len(b):
            return True
        if i >= len(a) or i >= len(b) or b[i] == "#":
            return False
        if a[i] == "+":
            if i == 0 and system:
                return False
            continue
        if b[i] == "+" or a[i] != b[i]:
            return False
    return False


def compare_topics(old: SchemaSet, new: SchemaSet) -> list[Finding]:
    findings: list[Finding] = []
    old_patterns = sorted(f for f, _ in old.topic_patterns)
    new_patterns = sorted(f for f, _ in new.topic_patterns)
    for pattern in old_patterns:
        if pattern in new_patterns:
            continue
        wider = [p for p in new_patterns if covers(p, pattern)]
        if wider:
            findings.append(Finding("topic pattern replaced", f"topic_patterns/{pattern}", pattern, wider[0], NEITHER,
                                    detail=f"its topics stay allowed by {wider[0]}"))
        else:
            findings.append(Finding("topic pattern removed", f"topic_patterns/{pattern}", pattern, None, NARROWING,
                                    detail="its topics are now rejected (0x90 Topic Name invalid)"))
    for pattern in new_patterns:
        if pattern in old_patterns:
            continue
        if not any(covers(p, pattern) for p in old_patterns):
            findings.append(Finding("topic pattern added", f"topic_patterns/{pattern}", None, pattern, WIDENING,
                                    detail="the old set rejects its topics"))

    old_maps, new_maps = _mappings(old), _mappings(new)
    for topic_filter in sorted(set(old_maps) | set(new_maps)):
        path = f"schema_mappings/{topic_filter}"
        o, n = old_maps.get(topic_filter), new_maps.get(topic_filter)
        if o is not None and n is not None:
            findings.extend(_changed_mapping(path, o, n))
        elif o is not None:
            findings.extend(_lost_mapping(path, o, new))
        elif n is not None:
            findings.extend(_gained_mapping(path, n, old))

    if old.unmapped != new.unmapped:
        breaks = NARROWING if new.unmapped == "reject" else WIDENING
        findings.append(Finding("unmapped policy changed", "policy/unmapped", old.unmapped, new.unmapped, breaks,
                                detail="allowed topics without a mapping are now " + ("rejected" if new.unmapped == "reject" else "accepted")))
    return findings


def _mappings(schema_set: SchemaSet) -> dict[str, Mapping]:
    return {topic_filter: mapping for topic_filter, mapping in schema_set.mappings}


def _example_topic(topic_filter: str) -> str:
    return topic_filter.replace("+", "x").replace("#", "x")


def _changed_mapping(path: str, old: Mapping, new: Mapping) -> list[Finding]:
    found = []
    if old.schema_name != new.schema_name:
        if old.schema_name is None:
            found.append(Finding("mapping now validates", path, None, new.schema_name, NARROWING,
                                 detail="payloads on these topics were accepted as they were"))
        elif new.schema_name is None:
            found.append(Finding("mapping no longer validates", path, old.schema_name, None, WIDENING,
                                 detail="payloads on these topics are now accepted as they are"))
        elif _base(old.schema_name) != _base(new.schema_name):
            found.append(Finding("mapping points to another schema", path, old.schema_name, new.schema_name, NEITHER,
                                 detail="the two schemas are compared as a pair (paired by topic filter)"))
    if old.on_reject != new.on_reject:
        found.append(Finding("on_reject changed", path, old.on_reject, new.on_reject, NEITHER))
    if old.forward != new.forward:
        found.append(Finding("forward changed", path, old.forward, new.forward, NEITHER))
    if old.dead_letter != new.dead_letter:
        found.append(Finding("dead-letter republish changed", path, _dead_letter(old), _dead_letter(new), NEITHER,
                             detail="where rejected messages are republished (on_reject.republish)"))
    return found


def _dead_letter(mapping: Mapping) -> str | None:
    dead = mapping.dead_letter
    if dead is None:
        return None
    qos = "the message's QoS" if dead.qos is None else f"QoS {dead.qos}"
    return (f"{dead.template} to {' and '.join(dead.destinations)}, {'envelope' if dead.envelope else 'payload as is'}, "
            f"{qos}{', retained' if dead.retain else ''}")


def _lost_mapping(path: str, old: Mapping, new: SchemaSet) -> list[Finding]:
    topic = _example_topic(old.topic_filter)
    if not new.topic_patterns.match(topic):
        return [Finding("mapping removed", path, old.schema_name, None, NEITHER,
                        detail="its topics are no longer allowed at all (see topic_patterns)")]
    best = new.mappings.best(topic)
    if best is not None:
        return [Finding("mapping removed", path, old.schema_name, best[1].schema_name, NEITHER,
                        detail=f"its topics now fall under {best[0]}")]
    if old.schema_name is None:
        return [] if new.unmapped == "accept" else [
            Finding("mapping removed", path, None, None, NARROWING, detail="its topics are now unmapped and rejected (policy unmapped: reject)")]
    if new.unmapped == "accept":
        return [Finding("mapping removed", path, old.schema_name, None, WIDENING,
                        detail="its topics are now unmapped and accepted without validation")]
    return [Finding("mapping removed", path, old.schema_name, None, NARROWING,
                    detail="its topics are now unmapped and rejected (policy unmapped: reject)")]


def _gained_mapping(path: str, new: Mapping, old: SchemaSet) -> list[Finding]:
    topic = _example_topic(new.topic_filter)
    if not old.topic_patterns.match(topic):
        return [Finding("mapping added", path, None, new.schema_name, NEITHER,
                        detail="its topics were not allowed at all before (see topic_patterns)")]
    best = old.mappings.best(topic)
    if best is not None:
        return [Finding("mapping added", path, best[1].schema_name, new.schema_name, NEITHER,
                        detail=f"its topics fell under {best[0]} before")]
    if old.unmapped == "reject":
        return [Finding("mapping added", path, None, new.schema_name, WIDENING,
                        detail="its topics were unmapped and rejected (policy unmapped: reject)")]
    if new.schema_name is None:
        return []
    return [Finding("mapping added", path, None, new.schema_name, NARROWING,
                    detail="its topics were accepted without validation; now they must match the schema")]


def _base(name: str) -> str:
    return name.split(":", 1)[0]
