"""Schema sets with dead-letter mappings: the demo set v1 with its mappings' values replaced."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "schemas" / "v1"

TEMPERATURE_LINE = "  sensor/+/temperature: temperature:v1"
STATUS_LINE = "  device/+/status: device_status:v1"


def mapping(schema: str, republish: str | None = None, *, action: str | None = None, extra: str = "") -> str:
    """A schema_mappings value block (indented under its filter)."""
    text = f"\n    schema: {schema}\n"
    if republish is not None or action is not None:
        text += "    on_reject:\n"
        if action is not None:
            text += f"      action: {action}\n"
        if republish is not None:
            text += "      republish:\n" + "".join(f"        {line}\n" for line in republish.strip().splitlines())
    return text.rstrip("\n") + extra


def schema_set(directory: Path, *, temperature: str | None = None, status: str | None = None,
               patterns: list[str] | None = None, unmapped: str = "accept") -> Path:
    """A copy of schemas/v1 whose mappings (and topic_patterns) are replaced as given."""
    shutil.copytree(V1, directory)
    manifest = directory / "manifest.yaml"
    text = manifest.read_text()
    if temperature is not None:
        text = text.replace(TEMPERATURE_LINE, "  sensor/+/temperature:" + temperature)
    if status is not None:
        text = text.replace(STATUS_LINE, "  device/+/status:" + status)
    if patterns is not None:
        start, end = text.index("topic_patterns:"), text.index("\n\n", text.index("topic_patterns:"))
        text = text[:start] + "topic_patterns:\n" + "".join(f"  - {p}\n" for p in patterns).rstrip("\n") + text[end:]
    text = text.replace("unmapped: accept", f"unmapped: {unmapped}")
    manifest.write_text(text)
    return directory
