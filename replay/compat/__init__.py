"""Static compatibility checks between schema sets, for `replay diff`.

Vocabulary:

- a **finding** is one difference between an old and a new schema (a JSON-pointer or
  `package.Message.field = N` path, the old and new values) and the **directions** it breaks:
  *narrowing* (the new set rejects something the old one accepted) breaks **BACKWARD**, *widening*
  (the new set accepts something the old one rejected) breaks **FORWARD**. A finding that breaks
  nothing is a note; one that may break but cannot be proven either way (`pattern` changed) counts
  as breaking.
- a **mode** (Confluent Schema Registry's: BACKWARD, FORWARD, FULL, their *_TRANSITIVE variants,
  NONE) says which directions a schema must keep; it comes from `compatibility:` in the manifest's
  `schema_files` entry, default BACKWARD.
- a **report** holds a result per schema pair (with a verdict for its mode and for each of
  BACKWARD, FORWARD and FULL), the topic findings, and the schemas added and removed.

Modules: `json_rules`, `proto_rules`, `avro_rules` and `sparkplug_rules` (one format each), `refs` ($ref resolution), `topics`
(patterns, mappings, policy), `manifest` (modes), `compare` (pairing, judging), `render` (text).
"""

from replay.compat.compare import compare_chain, compare_sets, pair_schemas
from replay.compat.manifest import CompatConfigError, read_modes
from replay.compat.model import CompatReport, Direction, Finding, Mode, SchemaResult, TopicResult
from replay.compat.render import render_text

__all__ = [
    "CompatConfigError",
    "CompatReport",
    "Direction",
    "Finding",
    "Mode",
    "SchemaResult",
    "TopicResult",
    "compare_chain",
    "compare_sets",
    "pair_schemas",
    "read_modes",
    "render_text",
]
