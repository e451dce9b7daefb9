"""Dead-letter topics: a mapping's `on_reject: {republish: {...}}` (docs/schemas.md, "Dead-letter topics").

- `appliance/republish.py` (the model layer): the declaration in the manifest, its checks
  (placeholders, loops) and topic rendering; pure, imported by governance and the pipeline.
- `republisher` (here): the pipeline sink that republishes rejected messages to the local broker (one
  MQTT connection of the appliance's own) and/or the cloud (a forward-only record in the message log).
"""
