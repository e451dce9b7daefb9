"""The governance check: topic allowlist, then schema, then rules — the hot path of every PUBLISH.

Order and answers (MQTT 5 reason codes; 3.1.1 publishers get a plain ack):
1. topic outside `topic_patterns` → 0x90 Topic Name invalid;
2. no mapping → the set's `policy.unmapped` (accept, or reject with 0x99);
3. built-in limits: payload size → 0x99, per-client rate → 0x97 Quota exceeded;
4. schema (JSON Schema, Protobuf, Avro or Sparkplug B) → 0x99 Payload format invalid;
5. rules (CEL) → 0x99.
An empty retained payload deletes a retained message and is accepted once the topic is allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from appliance.governance.schemaset import Mapping, SchemaSet
from appliance.mqtt import ReasonCode
from appliance.pipeline import Message, Reason, Verdict

if TYPE_CHECKING:  # the module loads protobuf: only a set with a sparkplug_b schema imports it
    from appliance.governance.sparkplug import SparkplugSchema

MAX_REASONS = 10


class Governance:
    name = "governance"

    def __init__(self, schema_set: SchemaSet, *, previous: Governance | None = None):
        """`previous`: the check this one replaces at a reload, whose state (Sparkplug B births) carries over."""
        self._accepts: dict[str | None, Verdict] = {}
        if previous is not None:
            _carry_state(previous.schema_set, schema_set)
        self.schema_set = schema_set

    @property
    def schema_set(self) -> SchemaSet:
        return self._schema_set

    @schema_set.setter
    def schema_set(self, schema_set: SchemaSet) -> None:
        """Swap in a new set atomically: a message is judged entirely by the old or the new one."""
        version = schema_set.version
        accepts: dict[str | None, Verdict] = {None: Verdict(True, schema_set=version)}
        for topic_filter, mapping in schema_set.mappings:
            accepts[topic_filter] = Verdict(
                True, schema_set=version, topic_filter=topic_filter, schema=mapping.schema_name,
                forward=mapping.forward, forward_qos=mapping.forward_qos,
            )
        previous = getattr(self, "_schema_set", None)
        if previous is not None:
            _carry_state(previous, schema_set)
        self._schema_set, self._accepts = schema_set, accepts

    def check(self, message: Message) -> Verdict:
        schema_set, accepts = self._schema_set, self._accepts
        topic = message.topic
        allowed, mapping = schema_set.route(topic)
        if not allowed:
            return Verdict.reject(
                Reason("topic", f"topic {topic!r} is not allowed by the schema set's topic_patterns"),
                reason_code=ReasonCode.TOPIC_NAME_INVALID,
                schema_set=schema_set.version,
            )
        if mapping is None:
            if schema_set.unmapped == "accept":
                return accepts[None]
            return Verdict.reject(
                Reason("topic", f"no schema is mapped to topic {topic!r} (policy.unmapped: reject)"),
                schema_set=schema_set.version,
            )
        payload = message.payload
        if not payload and message.retain:
            return accepts[mapping.topic_filter]  # deletes a retained message: nothing to validate
        if mapping.max_payload_size is not None and (problem := mapping.max_payload_size.exceeded(payload)):
            return self._reject(mapping, Reason("rule", problem, schema=mapping.schema_name))
        if mapping.rate_limit is not None and (problem := mapping.rate_limit.exceeded(message.client.client_id)):
            return self._reject(mapping, Reason("rule", problem, schema=mapping.schema_name), code=ReasonCode.QUOTA_EXCEEDED)
        decoded = None
        schema = mapping.schema
        if schema is not None:
            if schema.format == "sparkplug_b":  # the message type and the node are in the topic
                decoded, errors = cast("SparkplugSchema", schema).validate_topic(topic, payload, live=message.released_from is None)
            else:
                decoded, errors = schema.validate(payload)
            if errors:
                return self._reject(
                    mapping,
                    *(Reason("schema", e.message, schema=mapping.schema_name, path=e.path) for e in errors[:MAX_REASONS]),
                )
        if mapping.rules is not None:
            client = message.client
            failure = mapping.rules.evaluate_message(decoded, topic, client.client_id, client.username, client.peer)
            if failure is not None:
                return self._reject(mapping, Reason("rule", failure.message, schema=mapping.schema_name))
        return accepts[mapping.topic_filter]

    def _reject(self, mapping: Mapping, *reasons: Reason, code: ReasonCode = ReasonCode.PAYLOAD_FORMAT_INVALID) -> Verdict:
        return Verdict.reject(
            *reasons,
            reason_code=code,
            action=mapping.on_reject,
            schema_set=self._schema_set.version,
            topic_filter=mapping.topic_filter,
            schema=mapping.schema_name,
            dead_letter=mapping.dead_letter,
        )


def _carry_state(old: SchemaSet, new: SchemaSet) -> None:
    """Sparkplug B keeps what BIRTH certificates said across a reload: the old set's one state
    (shared by its sparkplug_b schemas) becomes the new set's, whatever the schemas are named."""
    old_state = next((cast("SparkplugSchema", schema).state for schema in old.schemas.values()
                      if schema.format == "sparkplug_b"), None)
    if old_state is not None and any(schema.format == "sparkplug_b" for schema in new.schemas.values()):
        from appliance.governance.sparkplug import share_state

        share_state(new.schemas.values(), old_state)
