"""The compatibility mode of each schema, from `compatibility:` in the manifest's `schema_files`.

The set loader (appliance/governance/schemaset.py) does not know this key yet, so it is read here
from the manifest file itself:

    schema_files:
      temperature:v2:
        file: temperature.json
        format: jsonschema
        compatibility: FULL        # default BACKWARD
"""

from __future__ import annotations

from pathlib import Path

import yaml

from replay.compat.model import Mode

MANIFEST = "manifest.yaml"


class CompatConfigError(ValueError):
    """A manifest names a compatibility mode that does not exist."""


def read_modes(directory: Path) -> dict[str, Mode]:
    """Schema name → mode, for the schemas whose manifest entry has `compatibility:`."""
    path = Path(directory) / MANIFEST
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # a set that loaded has a readable manifest; a missing one means "defaults"
    files = manifest.get("schema_files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return {}
    modes: dict[str, Mode] = {}
    for name, spec in files.items():
        if isinstance(spec, dict) and "compatibility" in spec:
            try:
                modes[str(name)] = Mode.parse(spec["compatibility"])
            except ValueError as exc:
                raise CompatConfigError(f"{path}: schema_files.{name}.compatibility: {exc}") from None
    return modes
