"""Governance: schema sets (topics, JSON Schema, Protobuf, Avro, Sparkplug B, CEL rules) and the check that applies them.

- `load_schema_set(dir)` reads and compiles a schema set (docs/schemas.md), or raises
  `SchemaSetError` listing every problem with its file and line.
- `Governance(schema_set)` is the pipeline check that judges every PUBLISH and will.
"""

from appliance.governance.check import Governance
from appliance.governance.errors import SchemaError, SchemaSetError
from appliance.governance.schemaset import Mapping, SchemaSet, load_schema_set

__all__ = ["Governance", "Mapping", "SchemaError", "SchemaSet", "SchemaSetError", "load_schema_set"]
