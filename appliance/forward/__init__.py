"""Store-and-forward to a cloud MQTT broker: accepted messages are read from the message log
(appliance/msglog) after the forwarder's durable cursor and sent until the cloud broker acknowledged
them.

- `config`: the `upstream:` section (UpstreamConfig, OutboxBounds).
- `outbox`: what is still to forward: the cursor, its index and bounds (Outbox); `pending` (the
  in-memory index) and `logtail` (reading the log forward from a position) serve it.
- `forwarder`: the MQTT client that drains the outbox in order (Forwarder, ForwarderStatus), over
  `link` (its MQTT connection) and, for ws:// and wss:// URLs, `transport` (MQTT over WebSockets).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from appliance.forward.config import OutboxBounds, UpstreamConfig

if TYPE_CHECKING:
    from appliance.forward.forwarder import Forwarder, ForwarderStatus
    from appliance.forward.outbox import Dropped, Outbox, OutboxDepth, OutboxRow

__all__ = [
    "Dropped", "Forwarder", "ForwarderStatus", "Outbox", "OutboxBounds", "OutboxDepth", "OutboxRow", "UpstreamConfig",
]

# The config module (UpstreamConfig, which appliance.config needs) is light; the forwarder and the
# outbox load when first used, so that reading a config does not import the MQTT link and SQLite.
_LAZY = {"Forwarder": "forwarder", "ForwarderStatus": "forwarder",
         "Dropped": "outbox", "Outbox": "outbox", "OutboxDepth": "outbox", "OutboxRow": "outbox"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"appliance.forward.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
