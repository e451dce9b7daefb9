"""The names the appliance records and exports, each declared once: every audit event kind
(`EventKind`, the `kind` column of the `events` table: docs/audit.md) and every Prometheus metric
(`Metric`: docs/operations.md). tests/docs/test_names.py keeps the code, this module and both tables
in step. A leaf module: it imports nothing of the appliance, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Literal


class EventKind(StrEnum):
    """What an audit event is about. A `StrEnum`: the value is what the `kind` column holds."""

    # The proxy: connections, and connections refused or cut short.
    CLIENT_CONNECTED = "client_connected"
    CLIENT_DISCONNECTED = "client_disconnected"
    AUTH_FAILED = "auth_failed"
    ACL_DENIED = "acl_denied"
    LIMIT_EXCEEDED = "limit_exceeded"
    ACCESS_REVOKED = "access_revoked"
    # The appliance: reloads.
    CONFIG_RELOAD = "config_reload"
    # The embedded broker.
    BROKER_EXIT = "broker_exit"
    BROKER_RESTART = "broker_restart"
    # The message log.
    LOG_DEGRADED = "log_degraded"
    LOG_RECOVERED = "log_recovered"
    LOG_CORRUPTION = "log_corruption"
    LOG_TORN_TAIL = "log_torn_tail"
    # Store and forward.
    UPLINK_UP = "uplink_up"
    UPLINK_DOWN = "uplink_down"
    OUTBOX_DROPPED = "outbox_dropped"
    OUTBOX_ERROR = "outbox_error"
    # The quarantine: a release recorded by the appliance that published it; a purge by whoever ran it
    # (the CLI or the console, through the admin socket, or the CLI appended offline).
    QUARANTINE_RELEASED = "quarantine_released"
    QUARANTINE_PURGED = "quarantine_purged"
    # The console: a user asked the running appliance to reload (its outcome is the `config_reload` event).
    RELOAD_REQUESTED = "reload_requested"
    # Dead-letter topics (on_reject.republish).
    DEAD_LETTER = "dead_letter"
    DEAD_LETTER_DROPPED = "dead_letter_dropped"


# Kinds another process may ask the running appliance to record (the admin socket's `audit_event`).
# Not QUARANTINE_RELEASED: only the process that published records a release (`quarantine_release`),
# so nothing that reaches the admin socket can write one that did not happen.
EXTERNAL_EVENT_KINDS = frozenset({EventKind.QUARANTINE_PURGED, EventKind.RELOAD_REQUESTED})


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric family: its name as exported (counters get `_total` appended by the exposition
    format), its type, its label names and its help text."""

    name: str
    type: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()

    @property
    def exported(self) -> str:
        """The sample name Prometheus sees: `_total` after a counter's name."""
        return self.name + "_total" if self.type == "counter" else self.name


# The values of `limit` in `limit_exceeded` events and the mqtt_proxy_limit_exceeded metric.
LIMITS = ("connections", "connections_per_address", "connect_size", "packet_size", "inflight", "subscriptions",
          "message_rate")


class Metric(Enum):
    """Every metric the appliance exports besides the standard process_* and python_* ones."""

    MESSAGES = MetricSpec("mqtt_proxy_messages", "counter", "Messages judged, by outcome (valid/invalid), topic filter and schema.",
                          ("status", "topic_filter", "schema"))
    VALIDATION_DURATION = MetricSpec("mqtt_proxy_validation_duration_seconds", "histogram",
                                     "Time the pipeline's checks took per message.")
    BUILD_INFO = MetricSpec("mqtt_proxy_build_info", "gauge",
                            "Always 1; the labels say which release runs on which Python and machine.",
                            ("version", "python", "machine"))
    UPTIME = MetricSpec("mqtt_proxy_uptime_seconds", "gauge", "Seconds since the appliance started.")
    STATE_DIR_FREE = MetricSpec("mqtt_proxy_state_dir_free_bytes", "gauge",
                                "Bytes free for the appliance on the file system of its state dir (audit log, outbox).")
    CONNECTION_STATUS = MetricSpec("mqtt_proxy_connection_status", "gauge", "1 while the broker behind the proxy accepts connections.")
    CONNECTED_CLIENTS = MetricSpec("mqtt_proxy_connected_clients", "gauge", "Client connections open now.")
    BROKER_RESTARTS = MetricSpec("mqtt_proxy_broker_restarts", "counter", "Times the embedded mosquitto was restarted.")
    CONFIG_RELOADS = MetricSpec("mqtt_proxy_config_reloads", "counter", "Config and schema set reloads, by result.", ("result",))
    LIMIT_EXCEEDED = MetricSpec("mqtt_proxy_limit_exceeded", "counter",
                                f"Times a client hit a limit, by limit ({', '.join(LIMITS)}).", ("limit",))
    AUTH_FAILURES = MetricSpec("mqtt_proxy_auth_failures", "counter", "Refused CONNECTs, by reason.", ("reason",))
    ACL_DENIED = MetricSpec("mqtt_proxy_acl_denied", "counter", "SUBSCRIBE filters the ACL denied (denied PUBLISHes "
                            "are invalid messages with check acl).", ("action",))
    AUDIT_UNAVAILABLE = MetricSpec("mqtt_proxy_audit_unavailable", "counter", "Accepted QoS 1/2 messages whose record "
                                   "could not be stored: answered with 0x97 Quota exceeded or a closed connection.")
    QUARANTINE_SIZE = MetricSpec("mqtt_proxy_quarantine_size_bytes", "gauge",
                                 "Bytes of rejected payloads held in the quarantine (purges show at the next retention pass).")
    AUDIT_PENDING = MetricSpec("mqtt_proxy_audit_pending_records", "gauge",
                               "Records in the message log not yet converted to Parquet (approximate).")
    AUDIT_LOST = MetricSpec("mqtt_proxy_audit_lost_records", "counter", "Records that could not be made durable (full disk, I/O errors).")
    AUDIT_HEALTHY = MetricSpec("mqtt_proxy_audit_healthy", "gauge", "1 while the message log writes.")
    LOG_SYNCS = MetricSpec("mqtt_proxy_log_syncs", "counter", "fdatasync calls of the message log.")
    LOG_APPENDED = MetricSpec("mqtt_proxy_log_appended_bytes", "counter", "Bytes appended to the message log.")
    AUDIT_HELPER_FAILURES = MetricSpec("mqtt_proxy_audit_helper_failures", "counter",
                                       "Helper processes (Parquet sealing, retention) that failed.")
    UPLINK_UP = MetricSpec("mqtt_proxy_uplink_up", "gauge", "1 while the cloud broker connection is up.")
    OUTBOX_MESSAGES = MetricSpec("mqtt_proxy_outbox_messages", "gauge", "Messages waiting in the outbox.")
    OUTBOX_BYTES = MetricSpec("mqtt_proxy_outbox_bytes", "gauge",
                              "Bytes of the messages waiting in the outbox (their records in the message log).")
    OUTBOX_OLDEST_AGE = MetricSpec("mqtt_proxy_outbox_oldest_age_seconds", "gauge", "Age of the oldest message in the outbox.")
    FORWARDED = MetricSpec("mqtt_proxy_forwarded", "counter", "Messages the cloud broker acknowledged.")
    DROPPED = MetricSpec("mqtt_proxy_dropped", "counter", "Messages dropped from the outbox by its bounds.")
    DEAD_LETTERS = MetricSpec("mqtt_proxy_dead_letters", "counter", "Rejected messages republished to a dead-letter topic, "
                              "by destination (local, cloud) and outcome.", ("to", "outcome"))
    DEAD_LETTER_QUEUE = MetricSpec("mqtt_proxy_dead_letter_queue", "gauge", "Dead letters waiting for the local broker.")


# What the proxy counts per connection (its `Count` commands, server.py), as (metric, label) pairs:
# the metric is one of these, the label its one label's value ("" for a metric without labels).
PROXY_COUNTED = (Metric.LIMIT_EXCEEDED, Metric.AUTH_FAILURES, Metric.ACL_DENIED, Metric.AUDIT_UNAVAILABLE)
Counted = tuple[Metric, str]
