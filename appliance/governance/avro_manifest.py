"""The manifest side of `format: avro`: `encoding`, `schema_ids` and `writers` read and checked,
every `.avsc` file of the set indexed once, each entry compiled into an `AvroSchema`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.governance.avro import ENCODINGS, AvroCompileError, AvroFiles, AvroSchema
from appliance.yamlsource import LineDict

MANIFEST = "manifest.yaml"
Report = Callable[[str, "int | None", str], None]  # (file, line, message)


def load_avro(directory: Path, specs: list[tuple[str, Any]], report: Report) -> dict[str, AvroSchema]:
    files = AvroFiles(directory, Path(directory).rglob("*.avsc"))
    for broken in files.broken.values():  # every .avsc of the set, used or not, as for JSON Schema
        report(broken.file, broken.line, broken.message)
    parsed: dict[str, Any] = {}
    failed: set[str] = set()

    def parse(file: str, line: int) -> Any:
        key = Path(file).as_posix()
        if key in failed:
            return None
        if key not in parsed:
            try:
                parsed[key] = files.parse(key)
            except AvroCompileError as exc:
                failed.add(key)
                if key not in files.broken:  # reported above
                    report(exc.file, exc.line, exc.message)
                return None
        return parsed[key]

    schemas: dict[str, AvroSchema] = {}
    for name, spec in specs:
        line = spec.line
        for key in ("message", "allow_unknown_fields", "node_metrics", "device_metrics"):
            if key in spec:
                report(MANIFEST, spec.line_of(key), f"schema_files.{name}: `{key}` is not for an avro schema")
        encoding = spec.get("encoding", "binary")
        if encoding not in ENCODINGS:
            report(MANIFEST, spec.line_of("encoding"), f"schema_files.{name}: encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
            continue
        reader = parse(spec["file"], line)
        ids: dict[int, tuple[str, Any]] = {}
        raw_ids = spec.get("schema_ids")
        if raw_ids is not None:
            if encoding != "confluent" or not isinstance(raw_ids, LineDict):  # every mapping of the YAML is one
                report(MANIFEST, spec.line_of("schema_ids"),
                       f"schema_files.{name}: schema_ids (Schema Registry id -> .avsc file) is for encoding: confluent")
                continue
            for number, file in raw_ids.items():
                if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**32 or not isinstance(file, str):
                    report(MANIFEST, raw_ids.line_of(number), f"schema_files.{name}.schema_ids: expected `ID: file.avsc` with an id from 0 to 2^32-1, got {number!r}: {file!r}")
                    continue
                writer = reader if Path(file).as_posix() == Path(spec["file"]).as_posix() else parse(file, raw_ids.line_of(number))
                if writer is not None:
                    ids[number] = (file, writer)
        writers: dict[str, Any] = {}
        raw_writers = spec.get("writers")
        if raw_writers is not None:
            if encoding != "single_object" or not isinstance(raw_writers, list) or not all(isinstance(f, str) for f in raw_writers):
                report(MANIFEST, spec.line_of("writers"),
                       f"schema_files.{name}: writers (a list of .avsc files older producers write with) is for encoding: single_object")
                continue
            for file in raw_writers:
                writer = parse(file, spec.line_of("writers"))
                if writer is not None:
                    writers[file] = writer
        if reader is None:
            continue
        try:
            schemas[name] = AvroSchema(name, spec["file"], reader, encoding=encoding, schema_ids=ids, writers=writers)
        except ValueError as exc:
            report(MANIFEST, line, f"schema_files.{name}: {exc}")
    return schemas
