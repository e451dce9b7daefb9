"""CEL rules: compile errors with positions, the variables a rule sees, and failures that never raise."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest

from appliance.governance.rules import (
    RuleError,
    RuleFailure,
    RuleSet,
    compile_rule,
    make_activation,
)

EVIDENCE_RULE = (
    "payload.device_id == topic[1] && payload.temperature >= -40.0 && payload.temperature <= 125.0"
)


def activation(
    payload: object,
    topic: str = "sensors/dev-7/climate",
    client_id: str = "gw-1",
    username: str | None = "alice",
    peer: str = "192.0.2.10:51234",
) -> Mapping[str, object]:
    return make_activation(payload, topic, client_id, username, peer)


def check(
    expression: str,
    payload: object = None,
    *,
    topic: str = "sensors/dev-7/climate",
    username: str | None = "alice",
) -> RuleFailure | None:
    return compile_rule("r", expression).evaluate(
        activation(payload, topic=topic, username=username)
    )


# --- the EVIDENCE rule, passing and failing


@pytest.mark.parametrize("temperature", [21.5, 21, -40, -40.0, 125, 125.0])
def test_evidence_rule_passes(temperature: object) -> None:
    rule = compile_rule("device_matches_topic", EVIDENCE_RULE)
    assert rule.evaluate(activation({"device_id": "dev-7", "temperature": temperature})) is None


@pytest.mark.parametrize(
    "payload, topic",
    [
        ({"device_id": "dev-8", "temperature": 21.5}, "sensors/dev-7/climate"),
        ({"device_id": "dev-7", "temperature": 125.5}, "sensors/dev-7/climate"),
        ({"device_id": "dev-7", "temperature": -41}, "sensors/dev-7/climate"),
        ({"device_id": "dev-7", "temperature": 21.5}, "sensors/dev-70"),
    ],
)
def test_evidence_rule_fails_with_name_and_expression(payload: object, topic: str) -> None:
    rule = compile_rule("device_matches_topic", EVIDENCE_RULE)
    failure = rule.evaluate(activation(payload, topic=topic))
    assert failure == RuleFailure(
        "device_matches_topic", f"rule 'device_matches_topic' failed: {EVIDENCE_RULE}"
    )


def test_compiled_rule_is_reusable_and_keeps_name_and_expression() -> None:
    rule = compile_rule("device_matches_topic", EVIDENCE_RULE)
    assert (rule.name, rule.expression) == ("device_matches_topic", EVIDENCE_RULE)
    for i in range(100):
        good = rule.evaluate(activation({"device_id": f"d{i}", "temperature": i}, topic=f"s/d{i}"))
        bad = rule.evaluate(activation({"device_id": f"d{i}", "temperature": i}, topic=f"s/x{i}"))
        assert good is None and bad is not None


def test_one_rule_evaluated_from_several_threads() -> None:
    rule = compile_rule("device_matches_topic", EVIDENCE_RULE)
    wrong: list[tuple[int, int]] = []

    def work(n: int) -> None:
        for k in range(2000):
            device = f"d{n}"
            failure = rule.evaluate(
                activation(
                    {"device_id": device, "temperature": k % 100},
                    topic=f"s/{device if k % 2 else 'other'}",
                )
            )
            if (failure is None) != bool(k % 2):
                wrong.append((n, k))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# --- the variables


def test_topic_levels_and_name() -> None:
    assert check("topic[0] == 'sensors' && topic[2] == 'climate' && size(topic) == 3") is None
    assert check("topic_name == 'sensors/dev-7/climate'") is None
    assert check("topic[0] == ''", topic="/leading/slash") is None
    assert check("size(topic) == 1 && topic[0] == 'flat'", topic="flat") is None


def test_topic_level_out_of_range_is_a_failure() -> None:
    failure = check("topic[3] == 'x'")
    assert (
        failure is not None
        and "could not be evaluated" in failure.message
        and "index" in failure.message.lower()
    )


def test_client_fields() -> None:
    assert (
        check(
            "client.id == 'gw-1' && client.username == 'alice' && client.peer == '192.0.2.10:51234'"
        )
        is None
    )
    assert check("client.username == ''", username=None) is None
    assert check("client.username.startsWith('ali')") is None
    assert check("client.id == topic[1]") is not None


def test_payload_may_be_a_list_a_scalar_or_null() -> None:
    assert check("size(payload) == 2 && payload[1] == 'b'", ["a", "b"]) is None
    assert check("payload == 'on'", "on") is None
    assert check("payload > 3", 5) is None
    assert check("payload == null", None) is None


def test_nested_maps_and_lists() -> None:
    payload = {
        "device": {"id": "dev-7", "tags": ["indoor", "floor-2"]},
        "readings": [{"kind": "temp", "value": 21.5}, {"kind": "hum", "value": 40}],
        "battery": None,
    }
    assert check("payload.device.id == topic[1]", payload) is None
    assert check("'indoor' in payload.device.tags", payload) is None
    assert check("payload.readings.all(r, r.value >= 0.0)", payload) is None
    assert check("payload.readings.exists(r, r.kind == 'hum' && r.value == 40)", payload) is None
    assert check("payload.readings[1].value < 100.0", payload) is None
    assert check("payload.battery == null", payload) is None
    assert check("payload.readings.map(r, r.kind) == ['temp', 'hum']", payload) is None
    assert check("payload.readings.all(r, r.value > 30.0)", payload) is not None


# --- numbers: ints and doubles compare, but do not mix in arithmetic


@pytest.mark.parametrize(
    "expression",
    [
        "payload.t >= -40.0",
        "payload.t == 21.0",
        "payload.t in [21.0]",
        "payload.d > 21",
        "payload.d < 22",
    ],
)
def test_int_and_double_compare_without_conversion(expression: str) -> None:
    assert check(expression, {"t": 21, "d": 21.5}) is None


def test_int_in_double_arithmetic_fails_with_a_hint_and_double_fixes_it() -> None:
    failure = check("payload.t * 1.8 + 32.0 > 50.0", {"t": 21})
    assert failure is not None
    assert "could not be evaluated" in failure.message and "write double(x)" in failure.message
    assert check("double(payload.t) * 1.8 + 32.0 > 50.0", {"t": 21}) is None
    assert check("double(payload.t) * 1.8 + 32.0 > 50.0", {"t": 21.0}) is None


def test_ints_stay_ints() -> None:
    assert check("payload.ids[payload.i] == 'b'", {"ids": ["a", "b"], "i": 1}) is None
    assert (
        check("payload.id == 9007199254740993", {"id": 9007199254740993}) is None
    )  # not exact as a double
    assert check("payload.id == 9223372036854775808u", {"id": 2**63}) is None
    failure = check("payload.id > 0", {"id": 2**64})
    assert failure is not None and "out of range" in failure.message


# --- evaluation errors are failures, never exceptions


def test_missing_field_is_a_failure_naming_the_key() -> None:
    failure = compile_rule("needs_nope", "payload.nope == 1").evaluate(
        activation({"device_id": "dev-7"})
    )
    assert failure == RuleFailure(
        "needs_nope", "rule 'needs_nope' could not be evaluated: no such key: nope"
    )
    assert check("payload.a.b.c == 1", {"a": {}}) is not None


def test_has_and_short_circuit_absorb_missing_fields() -> None:
    assert check("!has(payload.battery) || payload.battery > 10", {}) is None
    assert check("has(payload.battery) && payload.battery > 10", {}) is not None
    assert check("true || payload.nope == 1", {}) is None


@pytest.mark.parametrize(
    "expression, payload, says",
    [
        ("1 / payload.n == 1", {"n": 0}, "divide by zero"),
        ("payload.n % 0 == 1", {"n": 3}, "zero"),
        ("payload.s > 1", {"s": "x"}, "no operator or function for"),
        ("payload.s + 1 == 2", {"s": "x"}, "no operator or function for"),
        ("payload.n + 9223372036854775807 > 0", {"n": 1}, "overflow"),
        ("payload.t > 0", {"t": (1, 2)}, "tuple"),
        ("payload.t > 0", {"t": {1, 2}}, "set"),
        ("payload.t > 0", {"t": object()}, "object"),
    ],
)
def test_evaluation_errors_are_failures(expression: str, payload: object, says: str) -> None:
    failure = check(expression, payload)
    assert failure is not None
    assert failure.message.startswith("rule 'r' could not be evaluated: ")
    assert says in failure.message


def test_comparing_string_to_int_for_equality_is_simply_false() -> None:
    assert check("payload.s == 1", {"s": "1"}) is not None


def test_non_bool_result_is_a_failure() -> None:
    failure = check("payload.temperature", {"temperature": 21})
    assert failure == RuleFailure("r", "rule 'r' must give a bool, but gave int 21")
    failure = check("payload.name", {"name": "dev-7"})
    assert (
        failure is not None
        and "must give a bool" in failure.message
        and "string" in failure.message
    )


def test_statically_non_bool_rule_does_not_compile() -> None:
    with pytest.raises(RuleError, match="must give a bool, this one gives string") as caught:
        compile_rule("not_bool", "topic_name")
    assert caught.value.rule == "not_bool"
    with pytest.raises(RuleError, match="gives int"):
        compile_rule("not_bool", "size(topic) + 1")


# --- compile errors


def test_syntax_error_names_rule_position_and_expression() -> None:
    with pytest.raises(RuleError) as caught:
        compile_rule("device_matches_topic", "payload.device_id == ")
    error = caught.value
    assert (error.rule, error.line, error.column) == ("device_matches_topic", 1, 22)
    text = str(error)
    assert text.startswith("rule 'device_matches_topic' does not compile at 1:22: Syntax error")
    assert "payload.device_id == " in text


def test_syntax_error_on_a_later_line() -> None:
    with pytest.raises(RuleError) as caught:
        compile_rule("multi", "payload.a == 1 &&\n  (payload.b == 2")
    assert (caught.value.line, caught.value.column) == (
        2,
        18,
    )  # 1-based: just past "  (payload.b == 2"
    assert "at 2:18" in str(caught.value)


def test_unknown_variable_is_a_compile_error_listing_the_variables() -> None:
    with pytest.raises(RuleError) as caught:
        compile_rule("typo", "paylod.a == 1")
    assert (caught.value.line, caught.value.column) == (1, 7)  # cel-cpp points at the selection
    assert "undeclared reference to 'paylod.a'" in str(caught.value)
    assert "payload, topic, topic_name, client" in str(caught.value)


def test_every_problem_is_reported_first_one_positioned() -> None:
    with pytest.raises(RuleError) as caught:
        compile_rule("two", "a + b")
    assert (caught.value.line, caught.value.column) == (1, 1)
    assert "and 1 more: 1:5: undeclared reference to 'b'" in str(caught.value)


@pytest.mark.parametrize(
    "expression", ["topic[1] == 1", "topic_name > 1", "client.id + 1 == 2", "1 + 'a' == 2"]
)
def test_type_errors_on_known_variables_are_compile_errors(expression: str) -> None:
    with pytest.raises(RuleError, match="no matching overload") as caught:
        compile_rule("typed", expression)
    assert caught.value.line == 1 and caught.value.column is not None


def test_empty_expression_does_not_compile() -> None:
    with pytest.raises(RuleError) as caught:
        compile_rule("empty", "")
    assert caught.value.line == 1


# --- rule sets


def test_rule_set_returns_the_first_failure_in_order() -> None:
    rules = RuleSet(
        [
            compile_rule("has_temperature", "has(payload.temperature)"),
            compile_rule(
                "in_range", "payload.temperature >= -40.0 && payload.temperature <= 125.0"
            ),
            compile_rule("device_matches_topic", "payload.device_id == topic[1]"),
        ]
    )
    assert rules.evaluate(activation({"temperature": 21, "device_id": "dev-7"})) is None
    missing = rules.evaluate(activation({"device_id": "dev-7"}))
    assert missing is not None and missing.rule == "has_temperature"
    hot = rules.evaluate(activation({"temperature": 300, "device_id": "other"}))
    assert hot is not None and hot.rule == "in_range"
    wrong = rules.evaluate(activation({"temperature": 20, "device_id": "other"}))
    assert wrong is not None and wrong.rule == "device_matches_topic"


def test_rule_set_of_one_and_of_none() -> None:
    one = RuleSet([compile_rule("only", "payload.ok")])
    assert one.evaluate(activation({"ok": True})) is None
    failed = one.evaluate(activation({"ok": False}))
    assert failed is not None and failed.rule == "only"
    assert RuleSet([]).evaluate(activation({})) is None


def test_rule_set_reports_errors_and_non_bools_like_a_single_rule() -> None:
    rules = RuleSet(
        [
            compile_rule("first", "true"),
            compile_rule("second", "payload.n"),
            compile_rule("third", "payload.nope"),
        ]
    )
    assert rules.evaluate(activation({"n": 1})) == RuleFailure(
        "second", "rule 'second' must give a bool, but gave int 1"
    )
    failure = rules.evaluate(activation({"n": True}))
    assert failure == RuleFailure("third", "rule 'third' could not be evaluated: no such key: nope")


def test_rule_set_with_a_non_cel_value_in_the_payload_fails_instead_of_raising() -> None:
    rules = RuleSet([compile_rule("first", "true"), compile_rule("second", "payload.t > 0")])
    failure = rules.evaluate(activation({"t": 1, "extra": {1, 2}}))
    assert failure is not None and failure.rule == "second" and "set" in failure.message


@pytest.mark.parametrize("expression", ["payload.device_id == topic[1]", " payload.device_id==topic[0] "])
@pytest.mark.parametrize("payload", [
    {"device_id": "dev-7"}, {"device_id": "other"}, {"device_id": ""}, {"device_id": 7}, {"device_id": None},
    {"device_id": ["dev-7"]}, {}, {"other": "dev-7"}, None, "dev-7", [1, 2],
])
@pytest.mark.parametrize("topic", ["sensor/dev-7/temperature", "dev-7", "", "/dev-7", "sensor"])
def test_the_field_equals_topic_level_fast_path_decides_exactly_as_cel(expression, payload, topic):
    # The commonest rule is decided without cel-cpp when both sides are strings; every other case
    # goes to CEL. Either way the verdict (and its message) is CEL's.
    rule = compile_rule("device_matches_topic", expression)
    activation = make_activation(payload, topic, "c", None, "p")
    by_cel = rule._judge(rule._program.eval(data=activation))
    assert rule.evaluate(activation) == by_cel
    assert RuleSet([rule]).evaluate(activation) == by_cel
    always = compile_rule("always", "true")
    assert RuleSet([always, rule, always]).evaluate(activation) == by_cel
    # The hot path's entry point builds the activation only when CEL is needed: same verdicts.
    for rules in (RuleSet([rule]), RuleSet([always, rule, always]), RuleSet([rule, compile_rule("never", "false")])):
        assert rules.evaluate_message(payload, topic, "c", None, "p") == rules.evaluate(activation)


def test_expressions_that_only_look_like_the_fast_path_go_to_cel():
    for expression in ("payload.device_id == topic[1] && false", "payload.device_id != topic[1]",
                       "payload.a.b == topic[1]", "payload.device_id == topic[01]"):
        try:
            rule = compile_rule("r", expression)
        except RuleError:
            continue
        assert rule._field_level is None
    activation = make_activation({"device_id": "x"}, "a/x", "c", None, "p")
    assert compile_rule("r", "payload.device_id == topic[1] && false").evaluate(activation) is not None
