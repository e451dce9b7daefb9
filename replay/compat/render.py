"""A CompatReport as plain text (the rich, JUnit and Markdown renderings live with the CLI)."""

from __future__ import annotations

import json
from typing import Any

from replay.compat.model import CompatReport, Finding


def render_text(report: CompatReport) -> str:
    lines = [f"schema sets {report.old_version} -> {report.new_version}: {'BREAKING' if report.breaking else 'compatible'}"]
    for result in report.schemas:
        verdict = "compatible" if result.compatible else "BREAKING"
        per_mode = ", ".join(f"{mode} {'ok' if ok else 'breaks'}" for mode, ok in result.verdicts.items())
        lines.append("")
        lines.append(
            f"{result.old_name} ({result.old_version}) -> {result.name} ({result.new_version}) [{result.format}, "
            f"paired by {result.paired_by}]: {verdict} under {result.mode.value} ({per_mode})"
        )
        lines.extend(_finding(f) for f in result.findings)
        lines.extend(f"  warning: {w}" for w in result.warnings)
    for topics in report.topics:
        if topics.findings:
            verdict = "compatible" if topics.compatible else "BREAKING"
            lines.append("")
            lines.append(f"topics {topics.old_version} -> {topics.new_version}: {verdict} under {topics.mode.value}")
            lines.extend(_finding(f) for f in topics.findings)
    if report.added or report.removed:
        lines.append("")
    if report.added:
        lines.append(f"schemas added: {', '.join(report.added)}")
    if report.removed:
        lines.append(f"schemas removed: {', '.join(report.removed)}")
    return "\n".join(lines) + "\n"


def _finding(finding: Finding) -> str:
    if finding.breaks:
        level = f"{finding.level} {'+'.join(sorted(d.value for d in finding.breaks))}"
    else:
        level = "note"
    text = f"  {level}: {finding.kind} at {finding.path}: {_show(finding.old)} -> {_show(finding.new)}"
    return f"{text} ({finding.detail})" if finding.detail else text


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
