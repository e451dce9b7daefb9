"""Judging recorded messages with a schema set: the appliance's own `Governance` check, nothing else.

The one difference from the live appliance: per-client rate rules (`max_rate`) are taken out of the
target (and baseline) set, because a replay runs far faster than real time and every client would
look too fast. `rate_rules()` lists what was taken out, for the report.

Some checks keep state between messages (Sparkplug B: aliases from BIRTH certificates, sequence
numbers): a set with such a schema (`stateful()`) must be fed every message, in recorded order, by
one judge, so the replay runs in one process and the baseline set sees every message too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from appliance.governance import Governance, SchemaSet, load_schema_set
from appliance.governance.schemaset import Mapping
from appliance.governance.topics import TopicTrie
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from replay import rows as R
from replay.tally import UNMAPPED, ReasonTally, Sample, Tally, excerpt, normalise

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


class Judge:
    """Judges rows with the target set (and the baseline set, for rows without a recorded
    verdict) and adds the outcome to a Tally."""

    def __init__(self, target: SchemaSet, baseline: SchemaSet | None = None):
        self._target = Governance(target)
        self._baseline = Governance(baseline) if baseline is not None else None
        self._feed_baseline = stateful(baseline)
        self._clients: dict[tuple[str, str | None, str, int], ClientInfo] = {}
        self._reasons: dict[tuple[str, str, str | None], tuple[str, str | None, str]] = {}

    def _client(self, client_id: str, username: str | None, peer: str, version: int) -> ClientInfo:
        key = (client_id, username, peer, version)
        client = self._clients.get(key)
        if client is None:
            if len(self._clients) > 100_000:
                self._clients.clear()
            client = self._clients[key] = ClientInfo(
                client_id, username, peer, _VERSIONS.get(version, ProtocolVersion.MQTT_3_1_1)
            )
        return client

    def _reason_key(self, check: str, message: str, path: str | None) -> tuple[str, str | None, str]:
        key = (check, message, path)
        normalised = self._reasons.get(key)
        if normalised is None:
            if len(self._reasons) > 10_000:
                self._reasons.clear()  # bounded: values in messages can be endless
            text, where = normalise(message, path)
            normalised = self._reasons[key] = (check, where, text)
        return normalised

    def judge(self, batch: Iterable[R.Row], tally: Tally) -> None:
        check = self._target.check
        route = self._target.schema_set.route
        baseline = self._baseline.check if self._baseline is not None else None
        feed_baseline = self._feed_baseline
        recorded_sets = tally.recorded_sets
        group_of = tally.group
        client_of = self._client
        reason_key = self._reason_key
        for row in batch:
            (topic, payload, qos, retain, client_id, username, peer, version,
             recorded, ts, is_will, recorded_set, recorded_filter) = row
            if recorded_set is not None:
                recorded_sets[recorded_set] += 1
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
            client = client_of(client_id or "", username, peer or "", version or 4)
            message = Message(topic, payload, qos or 0, bool(retain), client, is_will=bool(is_will))
            verdict = check(message)
            if verdict.topic_filter is not None:
                group = group_of(verdict.topic_filter, verdict.schema)
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
                key = reason_key(reason.check, reason.message, reason.path)
                tallied = group.reasons.get(key)
                if tallied is None:
                    tallied = group.reasons[key] = ReasonTally(*key)
                tallied.count += 1
                if breaking:
                    tallied.breaking += 1
                if tallied.wants_sample(breaking):
                    tallied.add_sample(Sample(topic, client_id or "", ts, excerpt(payload), reference, breaking))
