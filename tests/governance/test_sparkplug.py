"""format: sparkplug_b — topic namespace, Tahu payload, BIRTH aliases, seq, declared metrics, state."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from appliance.governance import Governance, SchemaSetError, load_schema_set
from appliance.governance.sparkplug import SparkplugSchema, payload_class
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "fixtures" / "sparkplug" / "v1"
CLIENT = ClientInfo("edge1", None, "192.0.2.1:1", ProtocolVersion.MQTT_5)
P = payload_class()
NODE = "spBv1.0/plant1/{}/edge1"
DEVICE = "spBv1.0/plant1/{}/edge1/dev1"


def nbirth(seq: int = 0) -> bytes:
    message = P(timestamp=1, seq=seq)
    message.metrics.add(name="bdSeq", datatype=8, long_value=0)
    message.metrics.add(name="uptime_s", alias=1, datatype=8, long_value=10)
    return message.SerializeToString()


def dbirth(seq: int) -> bytes:
    message = P(timestamp=1, seq=seq)
    message.metrics.add(name="temperature", alias=10, datatype=9, float_value=21.0)
    message.metrics.add(name="speed_rpm", alias=12, datatype=3, int_value=1500)
    return message.SerializeToString()


def ddata(seq: int, **metric) -> bytes:
    message = P(timestamp=2, seq=seq)
    message.metrics.add(**(metric or {"alias": 10, "float_value": 22.5}))
    return message.SerializeToString()


@pytest.fixture
def schema() -> SparkplugSchema:
    return load_schema_set(EXAMPLE).schemas["plant:v1"]


def born(schema: SparkplugSchema) -> SparkplugSchema:
    assert schema.validate_topic(NODE.format("NBIRTH"), nbirth())[1] == []
    assert schema.validate_topic(DEVICE.format("DBIRTH"), dbirth(1))[1] == []
    return schema


def messages(errors) -> str:
    return " | ".join(e.message for e in errors)


def test_aliases_resolve_from_birth_certificates(schema):
    born(schema)
    decoded, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(2))
    assert errors == []
    assert decoded["values"] == {"temperature": 22.5}
    assert decoded["metrics"][0]["datatype"] == "Float" and decoded["metrics"][0]["alias"] == 10
    assert (decoded["group"], decoded["node"], decoded["device"], decoded["seq"]) == ("plant1", "edge1", "dev1", 2)


def test_unknown_alias_and_alias_before_birth(schema):
    _, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(5))
    assert "no DBIRTH seen for plant1/edge1/dev1" in messages(errors)
    born(schema)
    _, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(2, alias=44, float_value=1.0))
    assert errors[0].path == "/metrics/0" and "alias 44 was not declared in the DBIRTH" in errors[0].message


def test_sequence_numbers(schema):
    born(schema)
    assert schema.validate_topic(DEVICE.format("DDATA"), ddata(2))[1] == []
    _, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(4))
    assert "seq 4 out of order" in messages(errors) and "expected 3" in messages(errors)
    assert schema.validate_topic(DEVICE.format("DDATA"), ddata(5))[1] == []  # one gap, one rejection
    _, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(300))
    assert "out of range (0-255)" in messages(errors)
    _, errors = schema.validate_topic(DEVICE.format("DDATA"), P(timestamp=1).SerializeToString())
    assert "needs a sequence number" in messages(errors)


def test_sequence_wraps_after_255_and_resets_on_birth(schema):
    born(schema)
    for seq in [*range(2, 256), 0, 1]:
        assert schema.validate_topic(DEVICE.format("DDATA"), ddata(seq))[1] == [], seq
    assert schema.validate_topic(NODE.format("NBIRTH"), nbirth(0))[1] == []
    # A new session of the node: its devices must be born again before their aliases mean anything.
    _, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(1))
    assert "no DBIRTH seen" in messages(errors)


def test_state_is_kept_across_reloads():
    first = Governance(load_schema_set(EXAMPLE))
    for topic, payload in ((NODE.format("NBIRTH"), nbirth()), (DEVICE.format("DBIRTH"), dbirth(1))):
        assert first.check(Message(topic, payload, 1, False, CLIENT)).accepted
    first.schema_set = load_schema_set(REPO / "fixtures" / "sparkplug" / "v2")
    assert first.check(Message(DEVICE.format("DDATA"), ddata(2), 1, False, CLIENT)).accepted


@pytest.mark.parametrize("topic, reason", [
    ("spBv1.0/plant1/NDATA/edge1/dev1", "NDATA is a node message"),
    ("spBv1.0/plant1/DDATA/edge1", "DDATA is a device message"),
    ("spBv1.0/plant1/XDATA/edge1", "unknown Sparkplug message type 'XDATA'"),
    ("spBv1.0/plant1/NDATA", "is not spBv1.0/<group>/<message type>/<edge node>[/<device>]"),
    ("spBv1.0//NDATA/edge1", "is not spBv1.0/<group>"),
    ("spAv1.0/plant1/NDATA/edge1", "not in the Sparkplug B namespace"),
])
def test_topic_namespace(schema, topic, reason):
    decoded, errors = schema.validate_topic(topic, nbirth())
    assert decoded is None and reason in messages(errors)


@pytest.mark.parametrize("payload, reason", [
    (b"\x12\xff\xff", "cannot decode as a Sparkplug B payload"),
    (b"\x12\x05\x0a\x03ab", "cannot decode as a Sparkplug B payload"),  # a metric cut short
])
def test_garbage_payloads(schema, payload, reason):
    assert reason in messages(schema.validate_topic(NODE.format("NDATA"), payload)[1])


def test_every_prefix_of_a_payload_is_handled(schema):
    good = dbirth(1)
    for end in range(len(good)):
        decoded, errors = schema.validate_topic(DEVICE.format("DBIRTH"), good[:end])
        assert decoded is not None or errors  # never raises


def test_declared_metrics(schema):
    born(schema)
    checks = [
        (dict(name="humidity", datatype=9, float_value=1.0), "metric 'humidity' is not declared for devices"),
        (dict(alias=10, float_value=500.0), "above the declared maximum 125"),
        (dict(alias=10, float_value=-50.0), "below the declared minimum -40"),
        (dict(name="temperature", datatype=10, double_value=20.0), "is Double, declared Float"),
        (dict(alias=10, double_value=20.0), "is Float but carries double_value"),
        (dict(alias=10), "has no value"),
    ]
    for seq, (metric, reason) in enumerate(checks, start=2):
        _, errors = schema.validate_topic(DEVICE.format("DDATA"), ddata(seq, **metric))
        assert reason in messages(errors), (metric, errors)


def test_signed_integers_and_arrays():
    schema = SparkplugSchema("free")
    birth = P(timestamp=1, seq=0)
    birth.metrics.add(name="offset", datatype=1, int_value=2**32 - 5)  # Int8 -5, two's complement
    birth.metrics.add(name="bad", datatype=1, int_value=300)
    decoded, errors = schema.validate_topic(NODE.format("NBIRTH"), birth.SerializeToString())
    assert "300 is out of range for Int8" in messages(errors)
    birth = P(timestamp=1, seq=0)
    birth.metrics.add(name="offset", datatype=1, int_value=2**32 - 5)
    birth.metrics.add(name="levels", datatype=24, bytes_value=struct.pack("<3i", 1, -2, 3))
    birth.metrics.add(name="names", datatype=33, bytes_value=b"a\0bc\0")
    birth.metrics.add(name="flags", datatype=32, bytes_value=b"\x03\x00\x00\x00\xa0")
    decoded, errors = schema.validate_topic(NODE.format("NBIRTH"), birth.SerializeToString())
    assert errors == []
    assert decoded["values"] == {"offset": -5, "levels": [1, -2, 3], "names": ["a", "bc"], "flags": [True, False, True]}


def test_state_messages(schema):
    decoded, errors = schema.validate_topic("spBv1.0/STATE/scada1", b'{"online": false, "timestamp": 17}')
    assert errors == [] and decoded == {"message_type": "STATE", "host": "scada1", "online": False, "timestamp": 17}
    assert "JSON" in messages(schema.validate_topic("spBv1.0/STATE/scada1", b"ONLINE")[1])
    assert "online" in messages(schema.validate_topic("spBv1.0/STATE/scada1", b'{"timestamp": 1}')[1])


def test_commands_carry_no_sequence(schema):
    born(schema)
    command = P(timestamp=1)
    command.metrics.add(name="Node Control/Rebirth", datatype=11, boolean_value=True)
    assert schema.validate_topic(NODE.format("NCMD"), command.SerializeToString())[1] == []


def test_rules_see_metrics(tmp_path):
    d = tmp_path / "set"
    shutil.copytree(EXAMPLE, d)
    manifest = d / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace(
        'expr: payload.message_type == "STATE" || payload.group == "plant1"',
        'expr: payload.message_type != "DDATA" || payload.values["temperature"] < 30.0'))
    governance = Governance(load_schema_set(d))
    for topic, payload in ((NODE.format("NBIRTH"), nbirth()), (DEVICE.format("DBIRTH"), dbirth(1))):
        assert governance.check(Message(topic, payload, 1, False, CLIENT)).accepted
    assert governance.check(Message(DEVICE.format("DDATA"), ddata(2, alias=10, float_value=25.0), 1, False, CLIENT)).accepted
    hot = governance.check(Message(DEVICE.format("DDATA"), ddata(3, alias=10, float_value=35.0), 1, False, CLIENT))
    assert not hot.accepted and hot.reasons[0].check == "rule"


def test_manifest_declarations_are_checked(tmp_path):
    d = tmp_path / "set"
    shutil.copytree(EXAMPLE, d)
    manifest = d / "manifest.yaml"
    text = manifest.read_text()
    text = text.replace("{name: uptime_s, datatype: UInt64}", "{name: uptime_s, datatype: Uint64}")
    text = text.replace("{name: running, datatype: Boolean}", "{name: running, datatype: Boolean, max: 1}")
    text = text.replace("    format: sparkplug_b", "    format: sparkplug_b\n    file: sparkplug_b.proto")
    manifest.write_text(text)
    with pytest.raises(SchemaSetError) as caught:
        load_schema_set(d)
    problems = "\n".join(caught.value.problems)
    assert "got 'Uint64'" in problems
    assert "min and max are for numeric datatypes, not Boolean" in problems
    assert "`file` is not for sparkplug_b" in problems


def test_a_release_from_quarantine_leaves_the_state_alone():
    governance = Governance(load_schema_set(EXAMPLE))
    for topic, payload in ((NODE.format("NBIRTH"), nbirth()), (DEVICE.format("DBIRTH"), dbirth(1))):
        assert governance.check(Message(topic, payload, 1, False, CLIENT)).accepted
    assert not governance.check(Message(DEVICE.format("DDATA"), ddata(2, alias=10, float_value=900.0), 1, False, CLIENT)).accepted
    assert governance.check(Message(DEVICE.format("DDATA"), ddata(3), 1, False, CLIENT)).accepted
    # Released later (say the operator relaxed the range): seq 2 is old, not the node's next message.
    released = Message(DEVICE.format("DDATA"), ddata(2), 1, False, CLIENT, released_from=17)
    assert governance.check(released).accepted
    assert governance.check(Message(DEVICE.format("DDATA"), ddata(4), 1, False, CLIENT)).accepted


def split_set(root: Path, version: str) -> Path:
    """A set whose node topics map to one sparkplug_b schema and device topics to another."""
    d = root / version
    d.mkdir()
    (d / "manifest.yaml").write_text(
        f"version: {version}\ntopic_patterns: ['spBv1.0/#']\n"
        f"schema_mappings:\n  spBv1.0/+/+/+: nodes:{version}\n  spBv1.0/+/+/+/+: devices:{version}\n"
        f"schema_files:\n  nodes:{version}: {{format: sparkplug_b}}\n  devices:{version}: {{format: sparkplug_b}}\n"
        "policy:\n  unmapped: reject\n")
    return d


def ndata(seq: int) -> bytes:
    message = P(timestamp=2, seq=seq)
    message.metrics.add(alias=1, long_value=11)
    return message.SerializeToString()


def test_one_state_for_the_schemas_of_a_set(tmp_path):
    # One node's sequence runs across its node and device topics, mapped to two schemas here.
    governance = Governance(load_schema_set(split_set(tmp_path, "v1")))
    sequence = [(NODE.format("NBIRTH"), nbirth(0)), (DEVICE.format("DBIRTH"), dbirth(1)),
                (NODE.format("NDATA"), ndata(2)), (DEVICE.format("DDATA"), ddata(3))]
    for topic, payload in sequence:
        verdict = governance.check(Message(topic, payload, 1, False, CLIENT))
        assert verdict.accepted, (topic, verdict.reasons)
    # A reload carries that one state over as a whole, whatever the new schemas are called.
    governance.schema_set = load_schema_set(split_set(tmp_path, "v2"))
    assert governance.check(Message(NODE.format("NDATA"), ndata(4), 1, False, CLIENT)).accepted
    assert governance.check(Message(DEVICE.format("DDATA"), ddata(5), 1, False, CLIENT)).accepted
    late = governance.check(Message(NODE.format("NDATA"), ndata(5), 1, False, CLIENT))
    assert not late.accepted and "expected 6" in late.reasons[0].message


def test_devices_per_node_are_capped_least_recently_used_first(schema, monkeypatch):
    from appliance.governance import sparkplug

    monkeypatch.setattr(sparkplug, "MAX_DEVICES_PER_NODE", 3)
    assert schema.validate_topic(NODE.format("NBIRTH"), nbirth())[1] == []
    seq = 0
    for device in ("d1", "d2", "d3"):
        seq += 1
        assert schema.validate_topic(f"spBv1.0/plant1/DBIRTH/edge1/{device}", dbirth(seq))[1] == []
    seq += 1
    assert schema.validate_topic("spBv1.0/plant1/DDATA/edge1/d1", ddata(seq))[1] == []  # d1 used: d2 is the oldest
    seq += 1
    assert schema.validate_topic("spBv1.0/plant1/DBIRTH/edge1/d4", dbirth(seq))[1] == []
    devices = schema.state.node("plant1", "edge1").devices
    assert list(devices) == ["d3", "d1", "d4"]
    seq += 1
    _, errors = schema.validate_topic("spBv1.0/plant1/DDATA/edge1/d2", ddata(seq))
    assert "no DBIRTH seen for plant1/edge1/d2" in messages(errors)  # forgotten: it needs a rebirth
    seq += 1
    assert schema.validate_topic("spBv1.0/plant1/DDATA/edge1/d1", ddata(seq))[1] == []


def test_nodes_are_capped_least_recently_used_first(schema, monkeypatch):
    monkeypatch.setattr(type(schema.state), "MAX_NODES", 2)
    for node in ("n1", "n2"):
        assert schema.validate_topic(f"spBv1.0/plant1/NBIRTH/{node}", nbirth())[1] == []
    assert schema.validate_topic("spBv1.0/plant1/NDATA/n1", ndata(1))[1] == []  # n1 used: n2 is the oldest
    assert schema.validate_topic("spBv1.0/plant1/NBIRTH/n3", nbirth())[1] == []
    assert list(schema.state.nodes) == [("plant1", "n1"), ("plant1", "n3")]
    # n1 kept its BIRTH (aliases resolve, the count goes on); n2 is forgotten, not every node.
    assert schema.validate_topic("spBv1.0/plant1/NDATA/n1", ndata(2))[1] == []
    _, errors = schema.validate_topic("spBv1.0/plant1/NDATA/n2", ndata(1))
    assert "no NBIRTH seen for plant1/n2" in messages(errors)
