"""on_reject.republish in a manifest: what loads, what is refused (with file and line), and how a
dead-letter topic is rendered."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.mqtt.topics import filters_overlap
from appliance.republish import DeadLetter, _filter_shape, loop_problem, parse_template, shapes_overlap, template_shape
from appliance.governance import Governance, SchemaSetError, load_schema_set
from appliance.mqtt import ProtocolVersion
from appliance.pipeline import ClientInfo, Message
from tests.deadletter.conftest import mapping, schema_set
from tests.governance.payloads import temperature

CLIENT = ClientInfo("t1", None, "127.0.0.1:5000", ProtocolVersion.MQTT_5)


def problems(tmp_path, **kwargs) -> list[str]:
    directory = tmp_path / f"set{len(list(tmp_path.glob('set*')))}"
    with pytest.raises(SchemaSetError) as caught:
        load_schema_set(schema_set(directory, **kwargs))
    return caught.value.problems


def test_a_mapping_with_republish_loads_and_its_rejections_carry_it(tmp_path):
    loaded = load_schema_set(schema_set(tmp_path / "set", temperature=mapping(
        "temperature:v1", "topic: deadletter/{topic}\nto: [local, cloud]\nenvelope: false\nqos: 1\nretain: true",
        action="disconnect")))
    [(_, temp)] = [(f, m) for f, m in loaded.mappings if f == "sensor/+/temperature"]
    dead = temp.dead_letter
    assert dead is not None and temp.on_reject == "disconnect"
    assert (dead.template, dead.destinations, dead.envelope, dead.qos, dead.retain) == \
        ("deadletter/{topic}", ("local", "cloud"), False, 1, True)
    governance = Governance(loaded)
    verdict = governance.check(Message("sensor/t1/temperature", temperature(temperature=999), 1, False, CLIENT))
    assert not verdict.accepted and verdict.action == "disconnect" and verdict.dead_letter is dead
    accepted = governance.check(Message("sensor/t1/temperature", temperature(), 1, False, CLIENT))
    assert accepted.accepted and accepted.dead_letter is None
    # Other mappings, and rejections without a mapping, have none.
    status = governance.check(Message("device/d1/status", b"\x0a\xff", 1, False, CLIENT))
    assert not status.accepted and status.dead_letter is None
    outside = governance.check(Message("secret/x", b"", 0, False, CLIENT))
    assert not outside.accepted and outside.dead_letter is None


def test_defaults_and_the_plain_forms_still_load(tmp_path):
    loaded = load_schema_set(schema_set(tmp_path / "set",
                                        temperature=mapping("temperature:v1", "topic: dl/{client_id}/{schema}/{check}"),
                                        status="\n    schema: device_status:v1\n    on_reject: disconnect"))
    by_filter = dict(iter(loaded.mappings))
    dead = by_filter["sensor/+/temperature"].dead_letter
    assert dead is not None
    assert (dead.local, dead.cloud, dead.envelope, dead.qos, dead.retain) == (True, False, True, None, False)
    assert (by_filter["device/+/status"].on_reject, by_filter["device/+/status"].dead_letter) == ("disconnect", None)


@pytest.mark.parametrize(("template", "pattern"), [
    ("{topic}", "sensor/+/temperature"),                # the rejected topic itself
    ("events/dead/{topic}", "events/#"),                 # under another allowed pattern
    ("sensor/{client_id}/temperature", "sensor/+/temperature"),  # a client id can be any level
    ("sensor/dl/{schema}", "sensor/#"),                  # a literal prefix inside an allowed tree
])
def test_a_dead_letter_topic_that_the_set_could_judge_is_refused(tmp_path, template, pattern):
    patterns = ["sensor/+/temperature", "device/+/status", "events/#"] + ([pattern] if pattern == "sensor/#" else [])
    found = problems(tmp_path, temperature=mapping("temperature:v1", f"topic: {template!r}".replace("'", '"')), patterns=patterns)
    [problem] = found
    assert "manifest.yaml:" in problem and "schema_mappings.sensor/+/temperature.on_reject.republish.topic" in problem
    assert f"topic_patterns entry {pattern!r}" in problem and "must lie outside topic_patterns" in problem


def test_the_same_template_is_fine_outside_the_patterns_and_refused_under_a_catch_all(tmp_path):
    republish = "topic: '{topic}/invalid'"
    load_schema_set(schema_set(tmp_path / "ok", temperature=mapping("temperature:v1", republish)))  # sensor/+/temperature/invalid
    [problem] = problems(tmp_path, temperature=mapping("temperature:v1", republish),
                         patterns=["sensor/#", "device/+/status", "events/#"])
    assert "'sensor/#'" in problem and "sensor/+/temperature/invalid" in problem


def test_reject_unmapped_does_not_change_the_rule(tmp_path):
    # With policy.unmapped: reject, a topic outside every mapping but inside topic_patterns is still
    # judged (and rejected): a dead-letter topic there is refused all the same.
    [problem] = problems(tmp_path, temperature=mapping("temperature:v1", "topic: events/dl/{topic}"), unmapped="reject")
    assert "'events/#'" in problem


@pytest.mark.parametrize(("republish", "expected"), [
    ("topic: 'dl/{topic'", "unbalanced brace"),
    ("topic: dl/{device}", "unknown placeholder {device}"),
    ("topic: dl/{clientid}", "did you mean 'client_id'"),
    ("topic: dl/+/x", "wildcard"),
    ("topic: dl/#", "wildcard"),
    ("topic: $SYS/dl/{topic}", "starts with $"),
    ("topic: dl-{topic}", "{topic} must fill whole levels"),
    ("topic: ''", "non-empty topic template"),
    ("to: [local]", "needs `topic`"),
    ("topic: dl/{topic}\nto: [local, lan]", ".to must be local, cloud"),
    ("topic: dl/{topic}\nto: []", ".to must be local, cloud"),
    ("topic: dl/{topic}\nqos: 2", ".qos must be 0 or 1"),
    ("topic: dl/{topic}\nenvelope: yes please", ".envelope must be true"),
    ("topic: dl/{topic}\nretain: 1", ".retain must be true or false"),
    ("topic: dl/{topic}\ntopci: x", "unknown key 'topci'"),
])
def test_bad_republish_settings_are_named_with_their_line(tmp_path, republish, expected):
    [problem] = problems(tmp_path, temperature=mapping("temperature:v1", republish))
    assert expected in problem, problem
    assert "schema_mappings.sensor/+/temperature.on_reject.republish" in problem
    line = int(problem.split("manifest.yaml:", 1)[1].split(":", 1)[0])
    assert line > 10  # the line of the offending key (or of `republish`), not the top of the file


def test_bad_on_reject_shapes(tmp_path):
    [problem] = problems(tmp_path, temperature="\n    schema: temperature:v1\n    on_reject: quarantine")
    assert "on_reject must be reject, disconnect or a mapping with `republish`" in problem
    [problem] = problems(tmp_path, temperature=mapping("temperature:v1", action="drop"))
    assert "on_reject.action must be reject or disconnect" in problem
    [problem] = problems(tmp_path, temperature="\n    schema: temperature:v1\n    on_reject:\n      republsh: {topic: dl/x}")
    assert "did you mean 'republish'" in problem


def test_rendering_keeps_placeholders_in_their_level():
    parts = parse_template("dl/{client_id}/{schema}/{check}/{topic}", lambda message: pytest.fail(message))
    assert parts is not None
    dead = DeadLetter("dl/{client_id}/{schema}/{check}/{topic}", parts)
    assert dead.topic("sensor/t1/temperature", "a/b+c#d", "temperature:v1", "schema") == \
        "dl/a_b_c_d/temperature:v1/schema/sensor/t1/temperature"
    assert dead.topic("x", "c", None, "rule") == "dl/c/none/rule/x"
    first = parse_template("{client_id}/x", lambda message: pytest.fail(message))
    assert first is not None
    assert DeadLetter("{client_id}/x", first).topic("t", "$SYS", None, "rule") == "_SYS/x"  # never a $-topic


def test_shapes_overlap_like_mqtt_filters():
    def shape(template: str, mapping_filter: str = "a/+") -> tuple:
        parts = parse_template(template, lambda message: pytest.fail(message))
        assert parts is not None
        return template_shape(DeadLetter(template, parts), mapping_filter, "s:v1")

    def filt(text: str) -> tuple:
        return tuple("\x00+" if p == "+" else "\x00#" if p == "#" else p for p in text.split("/"))

    assert shapes_overlap(shape("dl/{topic}"), filt("dl/a/b"))
    assert shapes_overlap(shape("dl/{topic}"), filt("dl/#"))
    assert shapes_overlap(shape("dl/{topic}"), filt("+/+/+"))
    assert not shapes_overlap(shape("dl/{topic}"), filt("+/+"))       # always three levels
    assert not shapes_overlap(shape("dl/{topic}"), filt("dl/b/+"))
    assert shapes_overlap(shape("dl/{topic}", "a/#"), filt("dl/a"))    # a/# matches a
    assert shapes_overlap(shape("{topic}/x", "a/#"), filt("a/b/c/x"))
    assert not shapes_overlap(shape("{topic}/x", "a/#"), filt("a/b/c/y"))
    assert shapes_overlap(shape("p-{client_id}/{schema}"), filt("p-7/s:v1"))
    assert not shapes_overlap(shape("p-{client_id}/{schema}"), filt("q-7/s:v1"))
    assert not shapes_overlap(shape("p-{client_id}/{schema}"), filt("p-7/s:v2"))


_filters = st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=4).flatmap(
    lambda ls: st.sampled_from(["/".join(ls), "/".join([*ls, "#"]), "#"]))


@given(_filters, _filters)
def test_the_shape_search_agrees_with_mqtt_topics_on_plain_filters(a, b):
    """loop_problem asks mqtt/topics.py when the template renders to a plain filter and the shape
    search otherwise: both must give the same answer where both apply."""
    assert shapes_overlap(_filter_shape(a), _filter_shape(b)) is filters_overlap(a, b)


def test_loop_problem_on_plain_and_placeholder_templates():
    def loop(template: str, mapping_filter: str, patterns: list[str]) -> str | None:
        parts = parse_template(template, lambda message: pytest.fail(message))
        assert parts is not None
        return loop_problem(DeadLetter(template, parts), mapping_filter, "s:v1", patterns)

    assert loop("dl/{topic}", "a/+", ["+/a/#"]) is not None            # a plain filter: dl/a/+
    assert loop("dl/{topic}", "a/+", ["a/#", "deadletter/#"]) is None
    assert loop("{topic}/x", "a/#", ["a/b/c/x"]) is not None           # '#' in the middle: the shape search
    assert loop("p-{client_id}/x", "a/+", ["p-7/+"]) is not None        # a placeholder pattern
    assert loop("p-{client_id}/x", "a/+", ["q-7/+"]) is None


def test_appliance_check_refuses_cloud_dead_letters_without_forwarding(tmp_path):
    from click.testing import CliRunner

    from appliance.cli import main

    schemas = schema_set(tmp_path / "set", temperature=mapping("temperature:v1", "topic: deadletter/{topic}\nto: [cloud]"))
    config = tmp_path / "appliance.yaml"
    config.write_text(f"schemas: {schemas}\nstate_dir: {tmp_path / 'state'}\n")
    refused = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert refused.exit_code == 1 and "cloud needs forwarding (upstream.url is not set" in refused.output, refused.output
    config.write_text(config.read_text() + "upstream:\n  url: mqtt://127.0.0.1:1\n")
    accepted = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert accepted.exit_code == 0, accepted.output
    assert CliRunner().invoke(main, ["check", "--schemas", str(schemas)]).exit_code == 0  # the set alone is fine


def test_replay_diff_names_a_changed_dead_letter(tmp_path):
    from replay.compat.topics import compare_topics

    old = load_schema_set(schema_set(tmp_path / "old", temperature=mapping("temperature:v1", "topic: deadletter/{topic}")))
    new = load_schema_set(schema_set(tmp_path / "new", temperature=mapping(
        "temperature:v1", "topic: deadletter/{topic}\nto: [local, cloud]\nqos: 1")))
    [finding] = [f for f in compare_topics(old, new) if f.kind == "dead-letter republish changed"]
    assert finding.old == "deadletter/{topic} to local, envelope, the message's QoS"
    assert finding.new == "deadletter/{topic} to local and cloud, envelope, QoS 1"
    assert not finding.breaks  # where rejections go: no message's verdict changes
    assert [f for f in compare_topics(old, old) if f.kind == "dead-letter republish changed"] == []
