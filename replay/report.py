"""The replay report: a plain dict (what `--format json` prints, and what every other format is drawn
from) built from a merged `Tally`, and the `--fail-on` policy that turns it into an exit code.

"Breaking" means: the target set rejects a message that its reference accepted. The reference is
the verdict recorded with the message; for a message recorded without one (an NDJSON capture), the
`--baseline` set's verdict; with neither, the message is taken to be one that should pass, so a
rejection counts as breaking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from replay.tally import GroupTally, Tally, detail

REPORT_FORMAT = 1
MAX_REASONS = 10

TOTALS = GroupTally.COUNTS


@dataclass(frozen=True, slots=True)
class FailOn:
    """When breaking changes fail the replay: `any` (one breaking message), `never`, `rate>X%`
    (more than X percent of the judged messages) or `count>N` (more than N messages)."""

    text: str
    kind: str
    threshold: float = 0.0

    _PATTERN = re.compile(r"^\s*(rate|count)\s*>\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")

    @classmethod
    def parse(cls, text: str) -> FailOn:
        lowered = text.strip().lower()
        if lowered in ("any", "never"):
            return cls(lowered, lowered)
        match = cls._PATTERN.match(lowered)
        if not match:
            raise ValueError(f"--fail-on must be any, never, rate>X% (e.g. rate>0.1%) or count>N, got {text!r}")
        kind, number, percent = match.groups()
        value = float(number)
        if kind == "rate":
            if not percent:
                raise ValueError(f"--fail-on {text!r}: write the rate in percent, e.g. rate>0.1%")
            value /= 100.0
        return cls(text.strip(), kind, value)

    def failed(self, breaking: int, judged: int) -> bool:
        if self.kind == "never":
            return False
        if self.kind == "any":
            return breaking > 0
        if self.kind == "count":
            return breaking > self.threshold
        return judged > 0 and breaking / judged > self.threshold


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def _counts(group: GroupTally) -> dict[str, Any]:
    counts: dict[str, Any] = {name: getattr(group, name) for name in TOTALS}
    counts["breaking"] = group.breaking
    counts["breaking_rate"] = _rate(group.breaking, group.compared)
    return counts


def _group(group: GroupTally) -> dict[str, Any]:
    reasons = sorted(group.reasons.values(), key=lambda r: (-r.breaking, -r.count, r.check, r.message))
    return {
        "topic_filter": group.topic_filter,
        "schema": group.schema,
        **_counts(group),
        "reasons": [
            {
                "check": reason.check,
                "path": reason.path,
                "message": reason.message,
                # The message with the numbers every such message shares (the limits) put back.
                "detail": detail(reason.message, reason.limits),
                "count": reason.count,
                "breaking": reason.breaking,
                "samples": [s.to_dict() for s in sorted(reason.samples, key=lambda s: (s.ts is None, s.ts or 0.0))],
            }
            for reason in reasons[:MAX_REASONS]
        ],
        "more_reasons": max(0, len(reasons) - MAX_REASONS),
        "errors_by_reason": [{"message": m, "count": n} for m, n in group.error_reasons.most_common()],
    }


def build_report(
    tally: Tally,
    *,
    source: str,
    filters: dict[str, Any],
    target: dict[str, Any],
    baseline: dict[str, Any] | None,
    fail_on: FailOn,
    notes: list[str],
    static: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    total = GroupTally("(all)", None)
    for group in tally.groups.values():
        total.merge(group)
    groups = sorted(tally.groups.values(), key=lambda g: (-g.breaking, g.topic_filter, g.schema or ""))
    failed = fail_on.failed(total.breaking, total.compared)
    unreferenced = total.accepted_without_reference + total.rejected_without_reference
    if unreferenced and unreferenced == total.compared:
        reference = "none: no recorded verdicts and no baseline; every rejection counts as breaking"
    elif baseline is not None:
        reference = "the recorded verdicts; the baseline set's where none was recorded"
    elif unreferenced:
        reference = "the recorded verdicts; where none was recorded, every rejection counts as breaking"
    else:
        reference = "the recorded verdicts"
    return {
        "report_format": REPORT_FORMAT,
        "result": "breaking" if total.breaking else "compatible",
        "failed": failed,
        "exit_code": 1 if failed else 0,
        "fail_on": fail_on.text,
        "source": source,
        "filters": filters,
        "target": target,
        "baseline": baseline,
        "reference": reference,
        "recorded_with": dict(tally.recorded_sets.most_common()),
        "totals": _counts(total),
        "groups": [_group(group) for group in groups],
        "notes": notes,
        "static": static,
        "stats": stats,
    }


def breaking_reasons(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The reasons some newly rejected message had, each with only the newly rejected messages as
    examples (a message the reference rejected too is no example of what the change breaks)."""
    return [{**reason, "samples": [s for s in reason["samples"] if s["breaking"]]}
            for reason in group["reasons"] if reason["breaking"]]
