"""Store-and-forward to a cloud MQTT broker: accepted messages wait in the outbox (a table in the
audit journal's SQLite file) until the cloud broker acknowledged them.

- `config`: the `upstream:` section (UpstreamConfig, OutboxBounds).
- `outbox`: reading, deleting and bounding the outbox rows (Outbox).
- `forwarder`: the MQTT client that drains the outbox in order (Forwarder, ForwarderStatus).
"""

from appliance.forward.config import OutboxBounds, UpstreamConfig
from appliance.forward.forwarder import Forwarder, ForwarderStatus
from appliance.forward.outbox import Dropped, Outbox, OutboxDepth, OutboxRow

__all__ = [
    "Dropped", "Forwarder", "ForwarderStatus", "Outbox", "OutboxBounds", "OutboxDepth", "OutboxRow", "UpstreamConfig",
]
