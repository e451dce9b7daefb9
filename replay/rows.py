"""A recorded message on its way to a worker: a plain tuple in a fixed order (one per message, so
no objects), and the filters that select which recorded messages are replayed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

# Row layout: every source yields tuples in this order.
COLUMNS = (
    "topic",         # str
    "payload",       # bytes, or None when retention removed it
    "qos",           # int
    "retain",        # bool
    "client_id",     # str
    "username",      # str | None
    "peer",          # str
    "mqtt_version",  # int: 3, 4 or 5
    "verdict",       # "accept" | "reject" | None (not recorded)
    "ts",            # float, epoch seconds, or None
    "is_will",       # bool
    "schema_set",    # str | None: the set version that judged it when recorded
    "topic_filter",  # str | None: the mapping that applied when recorded
)
Row = tuple[str, bytes | None, int, bool, str, str | None, str, int, str | None, float | None, bool, str | None, str | None]

TOPIC, PAYLOAD, QOS, RETAIN, CLIENT_ID, USERNAME, PEER, MQTT_VERSION, VERDICT, TS, IS_WILL, SCHEMA_SET, TOPIC_FILTER = range(13)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which recorded messages to replay. `sample` keeps every Nth message that passes the other
    filters (1: all), in recording order, so a sampled replay is reproducible; `limit` caps the
    messages replayed (after sampling)."""

    since: datetime | None = None
    until: datetime | None = None
    topic: str | None = None
    client: str | None = None
    limit: int | None = None
    sample: int = 1

    def __post_init__(self) -> None:
        if self.sample < 1:
            raise ValueError("sample must be 1 or more (keep every Nth message)")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be 1 or more")
        if self.topic is not None:
            from appliance.mqtt.topics import topic_filter_problem

            problem = topic_filter_problem(self.topic)
            if problem:
                raise ValueError(f"--topic {self.topic!r} is not a topic filter: {problem}")

    def unsampled(self) -> Filters:
        """The same filters without sampling and limit (for the parts of a ChainedSource)."""
        return replace(self, sample=1, limit=None)

    def describe(self) -> dict[str, object]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "topic": self.topic,
            "client": self.client,
            "limit": self.limit,
            "sample": self.sample,
        }
