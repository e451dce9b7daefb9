"""Small real schema sets on disk, one schema each, for table-driven compatibility tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from appliance.governance.schemaset import SchemaSet, load_schema_set

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "fixtures" / "compat"


def json_set(root: Path, version: str, document: Any, *, name: str = "reading") -> SchemaSet:
    directory = root / version
    directory.mkdir(parents=True)
    (directory / "reading.json").write_text(json.dumps(document, indent=2))
    spec = {"file": "reading.json", "format": "jsonschema"}
    return _write(directory, version, {f"{name}:{version}": spec}, f"{name}:{version}")


def proto_set(root: Path, version: str, source: str, *, message: str = "demo.Reading", allow_unknown: bool = False) -> SchemaSet:
    directory = root / version
    directory.mkdir(parents=True)
    (directory / "reading.proto").write_text(source)
    spec: dict[str, Any] = {"file": "reading.proto", "format": "protobuf", "message": message}
    if allow_unknown:
        spec["allow_unknown_fields"] = True
    return _write(directory, version, {f"reading:{version}": spec}, f"reading:{version}")


def _write(directory: Path, version: str, files: dict[str, Any], schema: str) -> SchemaSet:
    manifest = {
        "version": version,
        "topic_patterns": ["meter/+/reading"],
        "schema_mappings": {"meter/+/reading": schema},
        "schema_files": files,
    }
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return load_schema_set(directory)
