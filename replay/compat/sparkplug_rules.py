"""Sparkplug B compatibility: the metric declarations (`node_metrics`, `device_metrics`) of two sets.

The payload definition is built in and the same in every set; what a set changes is which metrics a
node or device may send. BACKWARD (the new set accepts what the old one did) breaks when a metric is
no longer declared, its datatype changes or its range narrows, or declarations appear where there
were none; FORWARD breaks the other way round.
"""

from __future__ import annotations

from typing import Any

from replay.compat.model import BOTH, NARROWING, WIDENING, Finding


def compare_sparkplug(old: Any, new: Any) -> list[Finding]:
    findings: list[Finding] = []
    for section in ("node_metrics", "device_metrics"):
        before, after = getattr(old, section), getattr(new, section)
        if before is None and after is None:
            continue
        if before is None:
            findings.append(Finding("metric declarations added", f"/{section}", None, sorted(after), NARROWING,
                                    detail="every metric was accepted; now only the declared ones are"))
            continue
        if after is None:
            findings.append(Finding("metric declarations removed", f"/{section}", sorted(before), None, WIDENING,
                                    detail="only the declared metrics were accepted; now every metric is"))
            continue
        for name in sorted(set(before) | set(after)):
            path = f"/{section}/{name}"
            was, now = before.get(name), after.get(name)
            if now is None:
                findings.append(Finding("metric removed", path, was.describe(), None, NARROWING,
                                        detail="nodes still sending it are rejected"))
            elif was is None:
                findings.append(Finding("metric added", path, None, now.describe(), WIDENING,
                                        detail="the old set rejects it"))
            elif was.datatype != now.datatype:
                findings.append(Finding("datatype changed", path, was.datatype_name, now.datatype_name, BOTH))
            else:
                _range(findings, path, "min", was.minimum, now.minimum, lower=True)
                _range(findings, path, "max", was.maximum, now.maximum, lower=False)
    return findings


def _range(findings: list[Finding], path: str, key: str, was: float | None, now: float | None, *, lower: bool) -> None:
    if was == now:
        return
    if was is None:
        narrows = True
    elif now is None:
        narrows = False
    else:
        narrows = now > was if lower else now < was
    findings.append(Finding(f"{key} {'narrowed' if narrows else 'widened'}", f"{path}/{key}", was, now,
                            NARROWING if narrows else WIDENING))


