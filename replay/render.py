"""The report in each output format: a rich terminal table, JSON, JUnit XML (one testcase per topic
filter and schema, for CI) and Markdown (for a PR comment). All are drawn from the report dict."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any
from xml.etree import ElementTree as ET

from replay.report import breaking_reasons

COLUMNS = (
    ("replayed", "replayed"),
    ("still_accepted", "still accepted"),
    ("newly_rejected", "newly rejected"),
    ("newly_accepted", "newly accepted"),
    ("still_rejected", "still rejected"),
    ("unmapped", "unmapped"),
    ("errors", "errors"),
)


def _cell(group: dict[str, Any], key: str) -> int:
    """Without a reference verdict, an accepted message shows as still accepted and a rejected
    one as newly rejected (breaking)."""
    if key == "newly_rejected":
        return int(group["breaking"])
    if key == "still_accepted":
        return int(group["still_accepted"] + group["accepted_without_reference"])
    return int(group[key])


def _name(group: dict[str, Any]) -> str:
    return f"{group['topic_filter']} ({group['schema']})" if group["schema"] else group["topic_filter"]


def _percent(rate: float) -> str:
    return f"{rate * 100:.2f}%" if rate else "0%"


def _reason_text(reason: dict[str, Any]) -> str:
    where = f" at {reason['path']}" if reason["path"] else ""
    return f"[{reason['check']}{where}] {reason.get('detail') or reason['message']}"


def _sample_text(sample: dict[str, Any]) -> str:
    return f"{sample['time'] or '-'} {sample['client_id'] or '-'} {sample['topic']}: {sample['payload']}"


def headline(report: dict[str, Any]) -> str:
    totals = report["totals"]
    target = report["target"]["version"]
    if totals["breaking"]:
        text = (f"BREAKING: {totals['breaking']:,} of {totals['replayed']:,} messages "
                f"({_percent(totals['breaking_rate'])}) would be newly rejected by {target}")
    else:
        text = f"compatible: {totals['replayed']:,} messages replayed against {target}, none newly rejected"
    outcome = "fails" if report["failed"] else "passes"
    return f"{text}; --fail-on {report['fail_on']} {outcome} (exit {report['exit_code']})"


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def to_terminal(report: dict[str, Any], *, color: bool, width: int | None = None) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buffer = StringIO()
    console = Console(file=buffer, force_terminal=color, no_color=not color, width=width or 120,
                      highlight=False, soft_wrap=False)
    console.print(f"[bold]replay[/] {report['source']} → {report['target']['version']} ({report['target']['directory']})")
    console.print(f"reference: {report['reference']}")
    table = Table(show_lines=False)
    table.add_column("topic filter (schema)", no_wrap=True)
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for group in [*report["groups"], {"topic_filter": "total", "schema": None, **report["totals"]}]:
        style = "bold red" if group["breaking"] else None
        cells = [f"{_cell(group, key):,}" for key, _ in COLUMNS]
        table.add_row(_name(group), *cells, style=style, end_section=group is report["groups"][-1])
    console.print(table)
    for group in report["groups"]:
        reasons = breaking_reasons(group)
        if not reasons:
            continue
        console.print(Text(f"{_name(group)}: most common breaking reasons", style="bold"))
        for reason in reasons:
            console.print(f"  {reason['breaking']:>8,}  {_reason_text(reason)}", markup=False, soft_wrap=True)
            for sample in reason["samples"]:
                console.print(f"            e.g. {_sample_text(sample)}", markup=False, soft_wrap=True)
    _notes(report, lambda line: console.print(line, markup=False, soft_wrap=True))
    console.print(Text(headline(report), style="bold red" if report["failed"] else "bold green"))
    return buffer.getvalue()


def _notes(report: dict[str, Any], emit: Any) -> None:
    for note in report["notes"]:
        emit(f"note: {note}")
    static = report.get("static")
    if static:
        emit(f"static compatibility {static['old']['version']} → {static['new']['version']}:")
        if not static.get("available"):
            emit(f"  {static['note']}")
            return
        for line in static["text"].splitlines():
            emit(f"  {line}")
        if static.get("note"):
            emit(f"  note: {static['note']}")
    stats = report.get("stats")
    if stats:
        emit(f"{stats['messages']:,} messages in {stats['seconds']:.2f} s: {stats['messages_per_second']:,} msg/s "
             f"({stats['workers']} worker{'s' if stats['workers'] != 1 else ''})")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"### Replay against `{report['target']['version']}`", "", f"**{headline(report)}**", "",
             f"Source: {report['source']}. Reference: {report['reference']}.", ""]
    lines.append("| topic filter (schema) | " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|---|" + "---:|" * len(COLUMNS))
    for group in [*report["groups"], {"topic_filter": "**total**", "schema": None, **report["totals"]}]:
        cells = [str(_cell(group, key)) for key, _ in COLUMNS]
        if group["breaking"]:
            cells[2] = f"**{cells[2]}** ❌"
        lines.append(f"| {_md_cell(_name(group))} | " + " | ".join(cells) + " |")
    for group in report["groups"]:
        reasons = breaking_reasons(group)
        if not reasons:
            continue
        lines += ["", f"#### `{_md_cell(_name(group))}`: breaking reasons", ""]
        for reason in reasons:
            lines.append(f"- **{reason['breaking']:,}** × `{reason['check']}`"
                         + (f" at `{reason['path']}`" if reason["path"] else "") + f": {reason.get('detail') or reason['message']}")
            for sample in reason["samples"]:
                lines.append(f"  - `{sample['client_id'] or '-'}` at {sample['time'] or '-'} on `{sample['topic']}`: "
                             f"`{_md_cell(sample['payload'])}`")
    extra: list[str] = []
    _notes(report, extra.append)
    if extra:
        lines += ["", "<details><summary>Notes</summary>", "", "```", *extra, "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def to_junit(report: dict[str, Any]) -> str:
    groups = report["groups"]
    failures = sum(1 for g in groups if g["breaking"])
    suites = ET.Element("testsuites", name="replay", tests=str(len(groups)), failures=str(failures), errors="0")
    suite = ET.SubElement(suites, "testsuite", name=f"replay against {report['target']['version']}",
                          tests=str(len(groups)), failures=str(failures), errors="0", skipped="0",
                          time=str(report["stats"]["seconds"]) if report.get("stats") else "0")
    properties = ET.SubElement(suite, "properties")
    for name, value in (("source", report["source"]), ("target", report["target"]["directory"]),
                        ("reference", report["reference"]), ("fail_on", report["fail_on"]),
                        ("result", report["result"])):
        ET.SubElement(properties, "property", name=name, value=str(value))
    classname = f"replay.{report['target']['version']}"
    for group in groups:
        case = ET.SubElement(suite, "testcase", classname=classname, name=_name(group), time="0")
        if group["breaking"]:
            failure = ET.SubElement(case, "failure", type="breaking",
                                    message=f"{group['breaking']} of {group['replayed']} messages newly rejected "
                                            f"({_percent(group['breaking_rate'])})")
            body = []
            for reason in breaking_reasons(group):
                body.append(f"{reason['breaking']} x {_reason_text(reason)}")
                body += [f"    e.g. {_sample_text(sample)}" for sample in reason["samples"]]
            failure.text = "\n".join(body)
        counts = ", ".join(f"{title}: {_cell(group, key)}" for key, title in COLUMNS)
        ET.SubElement(case, "system-out").text = counts
    extra: list[str] = []
    _notes(report, extra.append)
    if extra:
        ET.SubElement(suite, "system-out").text = "\n".join(extra)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def render(report: dict[str, Any], fmt: str, *, color: bool = False) -> str:
    if fmt == "json":
        return to_json(report) + "\n"
    if fmt == "junit":
        return to_junit(report)
    if fmt == "markdown":
        return to_markdown(report)
    return to_terminal(report, color=color)
