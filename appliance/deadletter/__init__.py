"""Dead-letter topics: a mapping's `on_reject: {republish: {...}}` (docs/schemas.md, "Dead-letter topics").

- `spec`: the declaration in the manifest, its checks (placeholders, loops) and topic rendering; pure.
- `republisher`: the pipeline sink that republishes rejected messages to the local broker (one MQTT
  connection of the appliance's own) and/or the cloud (a forward-only record in the message log).

Only `spec` is imported here: the governance package imports it, and must not pull in I/O code.
"""

from appliance.deadletter.spec import DeadLetter

__all__ = ["DeadLetter"]
