"""What a `Session` asks of the server: typed commands, carried out in one place (`ClientLeg.execute`).

In the manner of mitmproxy's proxy/commands.py: the session never touches a socket. Every input it is
given (bytes from either leg, the broker leg opened, a commit of the message log, a timeout...)
returns the list of commands that input produced, and the server executes them in order:

- `SendToClient` / `SendToBroker`: bytes to write on a leg. At most one of each per input: all bytes
  for a leg from one received batch leave in one write. Bytes for the broker are held by the session
  until the broker leg is open (`Session.broker_connected`).
- `OpenBroker`: open the broker leg (the CONNECT passed); `CloseBroker`: half-close it (EOF, then
  read it to its end); `CloseClient`: close the client leg, with the reason to log.
- `Pause`: stop reading the client for a while (the message rate limit).
- `AwaitDurable`: acks are waiting for the message log; call `Session.release_acks()` after its next
  commit (`sync_now`: the client is blocked on us, ask for the sync at once).
- `Record`: an audit event; `Count`: a metric and its label, `(Metric, str)`.

One input's commands come in this order: SendToClient, the Records and Counts as they happened,
Pause, AwaitDurable, SendToBroker, OpenBroker, CloseBroker, CloseClient (so a leg is written before
it is closed).

Commands are slotted dataclasses, not frozen ones: one or two are made per received batch on the
hot path, and a frozen dataclass costs several times more to construct. Treat them as immutable.
The ones without fields are module constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from appliance.names import Counted, EventKind, Metric


@dataclass(slots=True)
class SendToClient:
    data: bytes


@dataclass(slots=True)
class SendToBroker:
    data: bytes


@dataclass(slots=True)
class OpenBroker:
    pass


@dataclass(slots=True)
class CloseBroker:
    pass


@dataclass(slots=True)
class CloseClient:
    reason: str | None


@dataclass(slots=True)
class Pause:
    seconds: float


@dataclass(slots=True)
class AwaitDurable:
    sync_now: bool


@dataclass(slots=True)
class Record:
    kind: EventKind
    detail: dict[str, object]


@dataclass(slots=True)
class Count:
    key: Counted  # (metric, label); label "" for a metric without labels


Command: TypeAlias = (
    SendToClient | SendToBroker | OpenBroker | CloseBroker | CloseClient | Pause | AwaitDurable | Record | Count
)

OPEN_BROKER = OpenBroker()
CLOSE_BROKER = CloseBroker()
AWAIT_DURABLE = AwaitDurable(sync_now=False)
AWAIT_DURABLE_SYNC_NOW = AwaitDurable(sync_now=True)


class Notes:
    """The audit events and metric counts of one session, kept as `Record` and `Count` commands in
    the order they happened. The session and its policy units write here; the session hands them to
    the server with the other commands of the same input."""

    __slots__ = ("commands", "peer", "client_id")

    def __init__(self, peer: str) -> None:
        self.commands: list[Command] = []
        self.peer = peer
        self.client_id: str | None = None  # set once the CONNECT named it (or the broker assigned it)

    def count(self, metric: Metric, label: str = "") -> None:
        self.commands.append(Count((metric, label)))

    def record(self, kind: EventKind, detail: dict[str, object]) -> None:
        self.commands.append(Record(kind, detail))

    def limit_exceeded(self, limit: str, text: str, *, count: bool = True) -> None:
        """A per-client limit was hit: the metric (unless `count` is False) and the audit event."""
        if count:
            self.count(Metric.LIMIT_EXCEEDED, limit)
        self.record(EventKind.LIMIT_EXCEEDED, {"client_id": self.client_id, "peer": self.peer, "limit": limit, "detail": text})
