"""Judging recorded messages with a schema set: the appliance's own `Governance` check, nothing else.

The one difference from the live appliance: per-client rate rules (`max_rate`) are taken out of the
target (and baseline) set, because a replay runs far faster than real time and every client would
look too fast. `rate_rules()` lists what was taken out, for the report.

Without rate rules the check is a pure function of the message, so a message repeated within a
batch (same topic, payload, QoS, retain flag, client and will flag) is judged once; the cache turns
itself off for a batch whose first messages do not repeat (payloads with time stamps).

Some checks keep state between messages (Sparkplug B: aliases from BIRTH certificates, sequence
numbers): a set with such a schema (`stateful()`) must be fed every message, in recorded order, by
one judge, so the replay runs in one process, the baseline set sees every message too, and no
verdict is taken from the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from appliance.governance import Governance, SchemaSet, load_schema_set
from appliance.governance.schemaset import Mapping
from appliance.mqtt.topics import TopicTrie
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message, Verdict
from replay import rows as R
from replay.tally import UNMAPPED, GroupTally, ReasonTally, Sample, Tally, common_numbers, excerpt, normalise, numbers

NO_PAYLOAD = "payload not recorded (removed by retention or a quarantine purge)"


def rate_rules(schema_set: SchemaSet) -> list[str]:
    """The per-client rate rules of a set, as `filter: name (count/per s)`."""
    found = []
    for topic_filter, mapping in schema_set.mappings:
        if mapping.rate_limit is not None:
            limit = mapping.rate_limit
            found.append(f"{topic_filter}: {limit.name} ({limit.count:g} per {limit.per:g} s)")
    return sorted(found)


def without_rate_limits(schema_set: SchemaSet) -> SchemaSet:
    """The same set with every `max_rate` rule removed (everything else is the very same objects)."""
    if not rate_rules(schema_set):
        return schema_set
    mappings: TopicTrie[Mapping] = TopicTrie()
    for topic_filter, mapping in schema_set.mappings:
        mappings.insert(topic_filter, dataclasses.replace(mapping, rate_limit=None))
    return dataclasses.replace(schema_set, mappings=mappings, _routes={})


def load_for_replay(directory: Path) -> SchemaSet:
    """Load a set (SchemaSetError when broken) and disable its rate rules."""
    return without_rate_limits(load_schema_set(directory))


def stateful(schema_set: SchemaSet | None) -> bool:
    """Whether judging a message depends on the messages before it (Sparkplug B's BIRTH and seq)."""
    return schema_set is not None and any(hasattr(schema, "state") for schema in schema_set.schemas.values())


_VERSIONS = {int(v): v for v in ProtocolVersion}
# The verdict cache holds up to CACHE_SIZE messages of at most CACHE_MAX_PAYLOAD bytes (so at most
# ~12 MB). A batch with fewer than one repeat per CACHE_MIN_HITS new messages (a repeat saves ~6 µs,
# a lookup costs ~0.3 µs) turns it off for the next CACHE_PAUSE batches, then it tries again.
CACHE_SIZE = 10_000
CACHE_MAX_PAYLOAD = 1_024
CACHE_MIN_HITS = 20
CACHE_PAUSE = 15
_NO_PROPERTIES = Message._field_defaults["properties"]
# Messages are built as plain tuples (see Judge.judge): the fields set here, then the defaults.
_MESSAGE_FIELDS = ("topic", "payload", "qos", "retain", "client", "properties", "is_will")
if Message._fields[: len(_MESSAGE_FIELDS)] != _MESSAGE_FIELDS:
    raise ImportError(f"appliance.pipeline.Message changed its fields ({Message._fields}): update replay.judge")
_MESSAGE_DEFAULTS = tuple(Message._field_defaults[name] for name in Message._fields[len(_MESSAGE_FIELDS):])


class Judge:
    """Judges rows with the target set (and the baseline set, for rows without a recorded
    verdict) and adds the outcome to a Tally."""

    def __init__(self, target: SchemaSet, baseline: SchemaSet | None = None):
        self._target = Governance(target)
        self._baseline = Governance(baseline) if baseline is not None else None
        self._feed_baseline = stateful(baseline)
        self._stateful = stateful(target) or self._feed_baseline  # no verdict cache then
        self._clients: dict[tuple[str | None, str | None, str | None, int | None], ClientInfo] = {}
        self._reasons: dict[tuple[str, str, str | None], tuple[tuple[str, str | None, str], tuple[str, ...]]] = {}
        self._verdicts: dict[tuple[object, ...], Verdict] = {}
        self._skip_cache = 0  # batches still to judge without the verdict cache

    def _client(self, client_id: str | None, username: str | None, peer: str | None, version: int | None) -> ClientInfo:
        """The ClientInfo of a recorded client, kept while there are not too many (a message costs
        a dict lookup, not an object)."""
        key = (client_id, username, peer, version)
        client = self._clients.get(key)
        if client is None:
            if len(self._clients) > 100_000:
                self._clients.clear()
            client = self._clients[key] = ClientInfo(
                client_id or "", username, peer or "", _VERSIONS.get(version or 4, ProtocolVersion.MQTT_3_1_1)
            )
        return client

    def _reason_key(self, check: str, message: str, path: str | None) -> tuple[tuple[str, str | None, str], tuple[str, ...]]:
        """The reason's group key (normalised), and the numbers normalising took out of it."""
        key = (check, message, path)
        normalised = self._reasons.get(key)
        if normalised is None:
            if len(self._reasons) > 10_000:
                self._reasons.clear()  # bounded: values in messages can be endless
            text, where = normalise(message, path)
            normalised = self._reasons[key] = ((check, where, text), numbers(message))
        return normalised

    def judge(self, batch: Iterable[R.Row], tally: Tally, item: int = 0, start: int = 0) -> None:
        """Judge `batch`: rows `start`, `start + 1`, ... of the `item`th piece of work, pieces in
        recording order (the position decides which samples are kept)."""
        check = self._target.check
        route = self._target.schema_set.route
        baseline = self._baseline.check if self._baseline is not None else None
        feed_baseline = self._feed_baseline
        recorded_sets = tally.recorded_sets
        group_of = tally.group
        clients = self._clients
        client_of = self._client
        reason_key = self._reason_key
        no_properties = _NO_PROPERTIES
        mapped: dict[str, GroupTally] = {}  # the target's topic filter → its group, for this batch
        # A message seen before (same topic, payload, QoS, retain, client, will flag) gets the same
        # verdict: the check is a pure function of them once rate rules are out. Used while it pays:
        # real payloads often carry a time stamp and never repeat.
        verdicts = self._verdicts
        caching = self._skip_cache == 0 and not self._stateful
        self._skip_cache = max(0, self._skip_cache - 1)
        hits = misses = 0
        new_tuple = tuple.__new__
        message_defaults = _MESSAGE_DEFAULTS
        run_set: str | None = None
        run = 0
        for offset, row in enumerate(batch, start):
            (topic, payload, qos, retain, client_id, username, peer, version,
             recorded, ts, is_will, recorded_set, recorded_filter) = row
            if recorded_set != run_set:  # counted in runs: a recording rarely changes sets
                if run_set is not None:
                    recorded_sets[run_set] += run
                run_set, run = recorded_set, 1
            else:
                run += 1
            if payload is None:
                _, mapping = route(topic)
                if mapping is not None:
                    group = group_of(mapping.topic_filter, mapping.schema_name)
                else:
                    group = group_of(recorded_filter or UNMAPPED, None)
                group.replayed += 1
                group.errors += 1
                group.error_reasons[NO_PAYLOAD] += 1
                continue
            client = clients.get((client_id, username, peer, version))
            if client is None:
                client = client_of(client_id, username, peer, version)
            # Message(...) without NamedTuple's Python-level __new__: a third of a microsecond a message.
            message = new_tuple(Message, (topic, payload, qos or 0, bool(retain), client, no_properties, bool(is_will),
                                          *message_defaults))
            if caching and len(payload) <= CACHE_MAX_PAYLOAD:
                same = (row[:8], is_will)
                cached = verdicts.get(same)
                if cached is None:
                    if len(verdicts) >= CACHE_SIZE:
                        verdicts.clear()
                    verdict = verdicts[same] = check(message)
                    misses += 1
                else:
                    verdict = cached
                    hits += 1
            else:
                verdict = check(message)
            topic_filter = verdict.topic_filter
            if topic_filter is not None:
                if (found := mapped.get(topic_filter)) is None:
                    found = mapped[topic_filter] = group_of(topic_filter, verdict.schema)
                group = found
            else:
                group = group_of(recorded_filter or UNMAPPED, None)
                group.unmapped += 1
            group.replayed += 1
            reference = recorded
            if baseline is not None and (reference is None or feed_baseline):
                judged = "accept" if baseline(message).accepted else "reject"
                reference = judged if reference is None else reference
            if verdict.accepted:
                group.accepted += 1
                if reference is None:
                    group.accepted_without_reference += 1
                elif reference == "accept":
                    group.still_accepted += 1
                else:
                    group.newly_accepted += 1
                continue
            group.rejected += 1
            if reference is None:
                group.rejected_without_reference += 1
                breaking = True
            elif reference == "accept":
                group.newly_rejected += 1
                breaking = True
            else:
                group.still_rejected += 1
                breaking = False
            for reason in verdict.reasons:
                key, values = reason_key(reason.check, reason.message, reason.path)
                tallied = group.reasons.get(key)
                if tallied is None:
                    tallied = group.reasons[key] = ReasonTally(*key)
                if tallied.limits != values:
                    tallied.limits = common_numbers(tallied.limits, values)
                tallied.count += 1
                if breaking:
                    tallied.breaking += 1
                if tallied.wants_sample(breaking, (item, offset)):
                    tallied.add_sample(Sample(topic, client_id or "", ts, excerpt(payload), reference, breaking, (item, offset)))
        if run_set is not None:
            recorded_sets[run_set] += run
        if caching and hits * CACHE_MIN_HITS < misses:
            self._skip_cache = CACHE_PAUSE  # few repeats: judge the next batches without the cache
            verdicts.clear()
