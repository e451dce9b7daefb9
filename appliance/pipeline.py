"""The governance pipeline: every PUBLISH (and every will) gets a `Verdict` before it goes anywhere.

Checks decide; sinks record. Neither knows about sockets: the proxy hands a `Message` to
`Pipeline.judge()` and acts on the verdict it returns. Checks (topic allowlist, schemas, rules) and
sinks (audit log, quarantine, outbox, metrics) plug in through the two small protocols below.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from appliance.mqtt import Properties, ProtocolVersion, ReasonCode

if TYPE_CHECKING:
    from appliance.republish import DeadLetter


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who sent a message, as the appliance saw them (mosquitto only ever sees the proxy)."""

    client_id: str
    username: str | None
    peer: str
    protocol_version: ProtocolVersion


class Message(NamedTuple):
    """One PUBLISH (or will) to judge. Immutable; a NamedTuple because one is built per message and
    a frozen dataclass costs four times as much to construct (0.7 vs 0.2 µs)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    client: ClientInfo
    properties: Properties = Properties.EMPTY
    is_will: bool = False
    received_at: float = 0.0  # time.time() when the proxy read it; 0.0 when not from the proxy
    released_from: int | None = None  # a message released from quarantine: the original verdict's id


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a check rejected a message: which check, against what, and the details."""

    check: str
    message: str
    schema: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: bool
    reasons: tuple[Reason, ...] = ()
    # What an MQTT 5 publisher is told when the message is rejected.
    reason_code: ReasonCode = ReasonCode.SUCCESS
    # "reject": answer and drop the message; "disconnect": also close the client.
    action: Literal["reject", "disconnect"] = "reject"
    # What judged it, for the audit log: the schema set's version, the mapping's topic filter and
    # the schema's name (e.g. "temperature:v1"), where one applied.
    schema_set: str | None = None
    topic_filter: str | None = None
    schema: str | None = None
    # Whether an accepted message goes to the store-and-forward outbox (the mapping's `forward`).
    forward: bool = True
    forward_qos: int | None = None  # the mapping's QoS towards the cloud; None: upstream.qos
    # A rejection: where the mapping's on_reject.republish sends it (the dead-letter sink acts on it).
    dead_letter: DeadLetter | None = None

    @classmethod
    def reject(
        cls,
        *reasons: Reason,
        reason_code: ReasonCode = ReasonCode.PAYLOAD_FORMAT_INVALID,
        action: Literal["reject", "disconnect"] = "reject",
        schema_set: str | None = None,
        topic_filter: str | None = None,
        schema: str | None = None,
        dead_letter: DeadLetter | None = None,
    ) -> Verdict:
        return cls(False, reasons, reason_code, action, schema_set, topic_filter, schema, dead_letter=dead_letter)

    @property
    def reason_text(self) -> str:
        return "; ".join(reason.message for reason in self.reasons)


ACCEPT = Verdict(True)


class Check(Protocol):
    """One governance check. Returns a rejection, or an acceptance that says what judged the
    message (kept for the sinks unless a later check rejects), or None when it has no opinion.
    A check with a true `enforced_in_dry_run` attribute (the ACL) rejects even in dry-run mode."""

    name: str

    def check(self, message: Message) -> Verdict | None: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """What judges messages, and what a verdict is recorded under: the checks in order, dry run, and
    the revision (a hash of the config and schema set) in force. Frozen: a reload builds a new
    policy and swaps it in with one assignment, so every message is judged and recorded under one
    policy, never under parts of two."""

    checks: tuple[Check, ...] = ()
    dry_run: bool = False
    revision: str = ""


class Sink(Protocol):
    """Receives every verdict, after the fact, with the time the checks took (µs) and the policy that
    judged it. Must be fast: it runs on the event loop. Returns a durability ticket: the message
    log's sequence number of the record it wrote (an acknowledgement waits until that record is
    durable), or 0 when the sink wrote nothing durable. A sink with a true `only_rejections`
    attribute gets only the verdicts that are not accepted."""

    def record(self, message: Message, verdict: Verdict, latency_us: int, delivered: bool, policy: Policy) -> int | None: ...


class Judged(NamedTuple):
    """What `Pipeline.judge` returns: the verdict to act on, and the ticket its acknowledgement
    waits for (0: nothing to wait for)."""

    verdict: Verdict
    ticket: int


_new_tuple = tuple.__new__


class FailedTickets:
    """Which tickets (sequence numbers) were never made durable: kept as ranges, in the order the
    store reported them (increasing). Only recent failures matter (an ack waits seconds at most), so
    at most `keep` ranges are remembered."""

    __slots__ = ("_firsts", "_lasts", "_keep")

    def __init__(self, keep: int = 65_536) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        self._keep = keep

    def add(self, first: int, last: int) -> None:
        # A full disk fails batch after batch: adjacent ranges merge, so a long outage is one range.
        if self._lasts and first <= self._lasts[-1] + 1 and first >= self._firsts[-1]:
            self._lasts[-1] = max(self._lasts[-1], last)
            return
        self._firsts.append(first)
        self._lasts.append(last)
        if len(self._firsts) > self._keep:
            del self._firsts[: -self._keep], self._lasts[: -self._keep]

    def __contains__(self, seq: int) -> bool:
        if not self._firsts:
            return False
        i = bisect_right(self._firsts, seq) - 1
        return i >= 0 and seq <= self._lasts[i]


class Pipeline:
    """Runs the policy's checks in order (the first rejection wins) and hands the verdict to every
    sink, with that policy.

    In dry-run mode every verdict is computed and recorded, but the proxy is told to accept.
    """

    __slots__ = ("policy", "_sinks", "_records", "_records_if_accepted")

    def __init__(self, checks: Sequence[Check] = (), sinks: Iterable[Sink] = (), *, dry_run: bool = False,
                 revision: str = ""):
        self.policy = Policy(tuple(checks), dry_run, revision)  # replaced whole, never changed in place
        self.sinks = tuple(sinks)

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self._sinks

    @sinks.setter
    def sinks(self, sinks: tuple[Sink, ...]) -> None:
        self._sinks = sinks
        self._records = tuple(sink.record for sink in sinks)  # bound once, not looked up per message
        # A sink that acts on rejections only (`only_rejections`: the dead letters) is not called
        # for the others: a call per accepted message fewer on the event loop.
        self._records_if_accepted = tuple(sink.record for sink in sinks if not getattr(sink, "only_rejections", False))

    def judge(self, message: Message) -> Judged:
        policy = self.policy  # read once: a message sees one policy from its checks to its records
        started = perf_counter_ns()
        verdict = ACCEPT
        for check in policy.checks:
            result = check.check(message)
            if result is not None:
                verdict = result
                if not result.accepted:
                    break
        latency_us = (perf_counter_ns() - started) // 1000
        # In dry run a rejection is recorded but the message is delivered, unless the rejecting
        # check is enforced even then (the ACL).
        delivered = verdict.accepted or (policy.dry_run and not getattr(check, "enforced_in_dry_run", False))
        ticket = 0
        for record in self._records_if_accepted if verdict.accepted else self._records:
            ticket = record(message, verdict, latency_us, delivered, policy) or ticket
        return _new_tuple(Judged, (ACCEPT if delivered else verdict, ticket))  # Judged(...), without its Python-level __new__

    @property
    def checks(self) -> tuple[Check, ...]:
        return self.policy.checks

    @property
    def dry_run(self) -> bool:
        return self.policy.dry_run


class CountingSink:
    """Counts verdicts and keeps the last few; for tests and the status command."""

    def __init__(self, keep: int = 1000):
        self.counts: Counter[str] = Counter()
        self.recent: deque[tuple[Message, Verdict]] = deque(maxlen=keep)

    def record(self, message: Message, verdict: Verdict, latency_us: int = 0, delivered: bool = True,
               policy: Policy | None = None) -> None:
        self.counts["accept" if verdict.accepted else "reject"] += 1
        self.recent.append((message, verdict))
