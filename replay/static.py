"""The static compatibility report (replay.compat: old set vs new set, no traffic) as a section of
the replay report, and what the traffic says about it.

The two answers differ in useful ways, and the section says so:
- static breaking, nothing recorded affected: the traffic never exercises the change (a field that
  is never sent, a topic nobody publishes to): safe for the devices in the recording, maybe not
  for others;
- static compatible, traffic breaks: the change depends on values (a tightened range or rule) or the
  recording was judged by another set than the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.governance import SchemaSet

compare_sets: Callable[..., Any] | None
render_text: Callable[[Any], str] | None
UNAVAILABLE: str | None
try:  # replay.compat is written separately; replay works without it, minus this section
    from replay.compat import compare_sets, render_text
except ImportError as _error:  # pragma: no cover - depends on what is installed
    compare_sets = render_text = None
    UNAVAILABLE = f"the static compatibility check (replay.compat) is not available: {_error}"
else:
    UNAVAILABLE = None

__all__ = ["UNAVAILABLE", "compare_sets", "render_text", "static_section"]


def _breaking_findings(result: Any) -> list[str]:
    return [f"{f.kind} at {f.path or '/'}" + (f" ({f.detail})" if f.detail else "")
            for f in result.findings if f.breaks & result.mode.directions]


def static_section(old: SchemaSet, new: SchemaSet, replay_groups: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The static report of old → new; with the replay's groups, which of its breaking changes the
    recorded traffic actually hit (a schema's change is hit when a message its group judged is
    newly rejected; a topic change when a message is newly rejected by the topic check)."""
    section: dict[str, Any] = {
        "old": {"directory": str(old.directory), "version": old.version},
        "new": {"directory": str(new.directory), "version": new.version},
    }
    if compare_sets is None or render_text is None:
        section.update(available=False, note=UNAVAILABLE)
        return section
    try:
        report = compare_sets(old, new)
    except ValueError as exc:  # CompatConfigError: a bad `compatibility:` in the manifest
        section.update(available=False, note=f"the static compatibility check failed: {exc}")
        return section
    changes = [(r.name, _breaking_findings(r)) for r in report.schemas if not r.compatible]
    changes += [("topics", _breaking_findings(t)) for t in report.topics if not t.compatible]
    section.update(available=True, breaking=len(changes), report=report.to_dict(), text=render_text(report))
    if replay_groups is None:
        return section
    hit_schemas = {g["schema"] for g in replay_groups if g["breaking"] and g["schema"]}
    hit_topics = any(r["breaking"] and r["check"] == "topic" for g in replay_groups for r in g["reasons"])
    replay_breaking = sum(g["breaking"] for g in replay_groups)
    unaffected = [
        {"schema": name, "changes": findings}
        for name, findings in changes
        if (name == "topics" and not hit_topics) or (name != "topics" and name not in hit_schemas)
    ]
    section["unaffected"] = unaffected
    if changes and replay_breaking == 0:
        section["note"] = (
            f"the static check finds breaking changes ({', '.join(n for n, _ in changes)}), but no recorded message "
            "is affected: the recorded traffic never exercises them (e.g. a field that is never sent). Safe for the "
            "devices in this recording; devices not in it may still break"
        )
    elif unaffected:
        section["note"] = (
            "breaking per the static check, yet no recorded message is affected: "
            + "; ".join(f"{u['schema']}: {', '.join(u['changes']) or 'see the report'}" for u in unaffected)
        )
    elif not changes and replay_breaking:
        section["note"] = (
            "the static check finds no breaking change, yet recorded messages are newly rejected: the change "
            "depends on values (a tightened range, pattern or rule), or the recording was judged by another "
            "set than the baseline"
        )
    return section
