"""Store-and-forward to a cloud MQTT broker: accepted messages are read from the message log
(appliance/msglog) after the forwarder's durable cursor and sent until the cloud broker acknowledged
them. Its settings, the `upstream:` section, are appliance/config/upstream.py.

- `outbox`: what is still to forward: the cursor, its index and bounds (Outbox); `pending` (the
  in-memory index) and `logtail` (reading the log forward from a position) serve it.
- `forwarder`: the MQTT client that drains the outbox in order (Forwarder, ForwarderStatus), over
  `link` (its MQTT connection) and, for ws:// and wss:// URLs, `transport` (MQTT over WebSockets).
"""

from __future__ import annotations

from appliance.forward.forwarder import Forwarder, ForwarderStatus
from appliance.forward.outbox import Dropped, Outbox, OutboxDepth, OutboxRow

__all__ = ["Dropped", "Forwarder", "ForwarderStatus", "Outbox", "OutboxDepth", "OutboxRow"]
