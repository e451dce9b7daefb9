"""The rows the audit log stores, as plain tuples in a fixed column order (one is built per message,
so no objects): `DECISION_COLUMNS` and `EVENT_COLUMNS` name the fields in order."""

from __future__ import annotations

import hashlib
import threading
import time

# A decision row: one per verdict (PUBLISH or will).
DECISION_COLUMNS = (
    "id",               # BIGINT, sortable: milliseconds since the epoch << 20 | sequence (see IdClock)
    "ts",               # DOUBLE on the way in, TIMESTAMPTZ in DuckDB: when the proxy read the message (UTC)
    "client_id",        # VARCHAR
    "username",         # VARCHAR, NULL when none
    "peer",             # VARCHAR, the client's real address "host:port"
    "mqtt_version",     # UTINYINT: 3, 4 (3.1.1) or 5
    "topic",            # VARCHAR
    "qos",              # UTINYINT
    "retain",           # BOOLEAN
    "payload",          # BLOB, NULL once payload retention removed it
    "payload_size",     # INTEGER
    "payload_sha256",   # VARCHAR, hex
    "schema_set",       # VARCHAR, the schema set's version ("v1"), NULL without a set
    "schema_name",      # VARCHAR, "temperature" of "temperature:v1"
    "schema_version",   # VARCHAR, "v1" of "temperature:v1"
    "topic_filter",     # VARCHAR, the mapping that applied ("sensor/+/temperature")
    "verdict",          # VARCHAR: 'accept' or 'reject'
    "reason_code",      # UTINYINT: the MQTT 5 reason code the publisher got (0 when accepted)
    "reasons",          # JSON text on the way in; STRUCT(check, message, schema, path)[] in DuckDB
    "latency_us",       # INTEGER: time spent judging
    "config_revision",  # VARCHAR: hash of the config and schema set in force
    "dry_run",          # BOOLEAN
    "is_will",          # BOOLEAN
    "released_from",    # BIGINT: for a message released from quarantine, the id of the original verdict
)

# An event row: connects, disconnects, config reloads, broker restarts, uplink changes, drops...
EVENT_COLUMNS = (
    "id",        # BIGINT, same clock as decisions
    "ts",        # DOUBLE / TIMESTAMPTZ
    "kind",      # VARCHAR: client_connected, client_disconnected, broker_restart, config_reload, ...
    "client_id", # VARCHAR, NULL when not about a client
    "peer",      # VARCHAR, NULL when not about a client
    "detail",    # JSON text / JSON in DuckDB
)


class IdClock:
    """Unique, sortable 63-bit ids: milliseconds since the epoch in the high bits, a counter in the
    low 20 bits (a million ids per millisecond before borrowing from the next). Never goes backwards,
    even when the wall clock does, as long as the last id is handed to `start_after`."""

    SEQUENCE_BITS = 20

    def __init__(self, start_after: int = 0):
        self._last = start_after
        self._lock = threading.Lock()

    def next(self, now: float | None = None) -> int:
        candidate = int((time.time() if now is None else now) * 1000) << self.SEQUENCE_BITS
        with self._lock:
            self._last = candidate if candidate > self._last else self._last + 1
            return self._last


def payload_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def ts_of_id(record_id: int) -> float:
    return (record_id >> IdClock.SEQUENCE_BITS) / 1000.0




# An outbox row: an accepted message waiting to be forwarded to the cloud broker (issue: store and
# forward). It lives in the journal's SQLite file, committed in the same transaction as its verdict;
# the forwarder deletes it once the cloud broker acknowledged it. `id` is the verdict's id, so the
# outbox drains in arrival order.
OUTBOX_COLUMNS = (
    "id",         # INTEGER PRIMARY KEY: the decision id
    "ts",         # REAL: when the proxy read the message (epoch seconds)
    "client_id",  # TEXT: the publishing sensor
    "topic",      # TEXT: the topic as published
    "payload",    # BLOB
    "qos",        # INTEGER: QoS towards the cloud broker (the mapping's forward_qos); NULL: upstream.qos
    "retain",     # INTEGER 0/1
    "schema",     # TEXT: the schema name that judged it ("temperature:v1"), NULL when none
)
