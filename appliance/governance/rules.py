"""CEL rules: named boolean expressions over a decoded payload, its topic and its client.

A rule is compiled once, when its schema set loads (`compile_rule`, which raises `RuleError` naming
the rule and the line:column of the problem), and evaluated on the hot path of every message it
applies to. The binding is Google's cel-cpp through `cel-expr-python`
(docs/decisions/0002-cel-binding.md).

Variables a rule can use (build them with `make_activation`, once per message):

- `payload`: the decoded payload as the schema decoded it: a map, a list or a scalar (`null`
  when the mapping has no schema). JSON objects are maps with string keys, so
  `payload.device_id`, `payload.readings[0].value` and `has(payload.battery)` work.
- `topic`: the topic levels, a `list(string)`: for `sensors/dev-7/climate`, `topic[1]` is
  `"dev-7"` and `size(topic)` is 3. A leading `/` makes `topic[0]` the empty string.
- `topic_name`: the whole topic, a `string`.
- `client`: a `map(string, string)` with `id` (the MQTT client id), `username` (`""` when the
  client sent none) and `peer` (the address the client connected from, `host:port`).

Numbers: JSON `21` arrives as a CEL `int` and `21.5` as a `double`. Comparisons work across the two
(`payload.temperature >= -40.0` holds for the int 21, and `21 == 21.0`), so range checks need
nothing special. Arithmetic does not mix them: `payload.temperature * 1.8` fails on an int
temperature; write `double(payload.temperature) * 1.8`. Payload values are handed over unchanged
(converting ints to doubles would lose precision on large ids and break `list[index]`).
Integers beyond int64 become `uint` up to 2^64-1; larger ones make the rule fail.

Results: a rule passes only when it evaluates to `true`. `false`, an evaluation error (a missing
key, division by zero, an int mixed with a double in arithmetic, an index out of range) and a
non-bool result are all a `RuleFailure`; nothing raises on the hot path. `has(payload.x)` tests
for a key, and `||` / `&&` absorb errors on the side they don't need (`!has(payload.x) ||
payload.x > 0`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

from cel_expr_python import cel  # type: ignore[import-untyped]  # ships .pyi but no py.typed

__all__ = ["Rule", "RuleError", "RuleFailure", "RuleSet", "compile_rule", "make_activation"]


class RuleError(Exception):
    """A rule that does not compile. str() names the rule, where (line:column, 1-based, within the
    expression) and the expression; the schema-set loader adds the manifest file and line."""

    def __init__(
        self,
        rule: str,
        expression: str,
        problem: str,
        line: int | None = None,
        column: int | None = None,
    ):
        self.rule = rule
        self.expression = expression
        self.problem = problem
        self.line = line
        self.column = column
        where = f" at {line}:{column}" if line is not None else ""
        super().__init__(
            f"rule {rule!r} does not compile{where}: {problem} (expression: {expression!r})"
        )


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """Why a message broke a rule: the rule's name and a sentence for the audit log and reason string."""

    rule: str
    message: str


_S = cel.Type.STRING
_VARIABLES = {
    "payload": cel.Type.DYN,
    "topic": cel.Type.List(_S),
    "topic_name": _S,
    "client": cel.Type.Map(_S, _S),
}
_BOOL = cel.Type.BOOL
_DYN = cel.Type.DYN
_ERROR = cel.Type.ERROR


@cache
def _env() -> Any:
    # Built on first use, not at import: NewEnv takes ~18 ms (the standard library's declarations).
    return cel.NewEnv(variables=_VARIABLES)


# The commonest rule, "this field names the device the topic names": decided in Python when both
# sides are strings (about 0.2 µs instead of ~4 µs through cel-cpp, most of it converting the
# payload), by CEL otherwise, so that a missing key, another type or an index out of range fail
# exactly as CEL says.
class _AskCel(enum.Enum):
    """The fast path cannot decide: CEL must. An enum member so that `is not _ASK_CEL` narrows."""

    ASK_CEL = enum.auto()


_ASK_CEL: Final = _AskCel.ASK_CEL
_FIELD_EQUALS_LEVEL = re.compile(r"\s*payload\.([A-Za-z_][A-Za-z0-9_]*)\s*==\s*topic\[(0|[1-9][0-9]*)\]\s*")


class Rule:
    """One compiled rule. Evaluating it is thread-safe and can be repeated any number of times."""

    __slots__ = ("_failed", "_field_level", "_program", "expression", "name")

    name: str
    expression: str

    def __init__(self, name: str, expression: str, program: Any):
        self.name = name
        self.expression = expression
        self._program = program
        self._failed = RuleFailure(name, f"rule {name!r} failed: {expression}")
        fast = _FIELD_EQUALS_LEVEL.fullmatch(expression)
        self._field_level = (fast.group(1), int(fast.group(2))) if fast is not None else None

    def _decide(self, payload: object, levels: object) -> RuleFailure | None | _AskCel:
        """The fast path's verdict on the payload and the topic's levels, or _ASK_CEL."""
        field_level = self._field_level
        if field_level is None:
            return _ASK_CEL
        if type(payload) is not dict:
            return _ASK_CEL
        value = payload.get(field_level[0])
        if type(value) is not str or type(levels) is not list or field_level[1] >= len(levels):
            return _ASK_CEL
        level = levels[field_level[1]]
        if type(level) is not str:
            return _ASK_CEL
        return None if value == level else self._failed

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.expression!r})"

    def evaluate(self, activation: Mapping[str, object]) -> RuleFailure | None:
        """None if the rule holds for this message, else why not. Never raises for the message's sake."""
        decided = self._decide(activation["payload"], activation["topic"])
        if decided is not _ASK_CEL:
            return decided
        return self._judge(self._program.eval(data=activation))

    def _judge(self, result: Any) -> RuleFailure | None:
        value = result.value()
        if value is True:
            return None
        if value is False:
            return self._failed
        kind = result.type()
        if kind == _ERROR:
            return RuleFailure(
                self.name, f"rule {self.name!r} could not be evaluated: {_explain(value)}"
            )
        return RuleFailure(
            self.name,
            f"rule {self.name!r} must give a bool, but gave {kind.name().lower()} {value!r}",
        )


def compile_rule(name: str, expression: str) -> Rule:
    """Parse and type-check `expression` against the rule variables; raise RuleError if it can't hold."""
    try:
        program = _env().compile(expression)
    except RuntimeError as exc:
        problem, line, column = _compile_problem(str(exc))
        raise RuleError(name, expression, problem, line, column) from None
    returns = program.return_type()
    if returns != _BOOL and returns != _DYN:
        raise RuleError(
            name, expression, f"a rule must give a bool, this one gives {returns.name().lower()}"
        )
    return Rule(name, expression, program)


def make_activation(
    payload: object, topic: str, client_id: str, username: str | None, peer: str
) -> Mapping[str, object]:
    """The variables for one message, built once and shared by every rule that judges it."""
    return {
        "payload": payload,
        "topic": topic.split("/"),
        "topic_name": topic,
        "client": {"id": client_id, "username": username or "", "peer": peer},
    }


class RuleSet:
    """The rules of one mapping, evaluated in manifest order; the first failure decides.

    First, not all: a message is rejected with one reason either way, later rules often assume what
    earlier ones checked (`has(payload.x)` then `payload.x > 0`), and stopping early keeps the hot path
    at one evaluation per rule that passed."""

    __slots__ = ("_single", "rules")

    def __init__(self, rules: Sequence[Rule]):
        self.rules = tuple(rules)
        self._single = self.rules[0] if len(self.rules) == 1 else None

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, activation: Mapping[str, object]) -> RuleFailure | None:
        if self._single is not None:
            return self._single.evaluate(activation)
        return self._evaluate(activation, 0)

    def evaluate_message(self, payload: object, topic: str, client_id: str, username: str | None,
                         peer: str) -> RuleFailure | None:
        """`evaluate(make_activation(...))`, building the activation only once a rule needs CEL: the
        fast path needs only the payload and the topic's levels (the hot path of every message)."""
        levels = topic.split("/")
        for index, rule in enumerate(self.rules):
            decided = rule._decide(payload, levels)
            if decided is _ASK_CEL:  # this rule and those after it: as evaluate() judges them
                activation = make_activation(payload, topic, client_id, username, peer)
                return rule.evaluate(activation) if self._single is not None else self._evaluate(activation, index)
            if decided is not None:
                return decided
        return None

    def _evaluate(self, activation: Mapping[str, object], start: int) -> RuleFailure | None:
        # Converting the variables once and reusing them is cheaper from the second rule on.
        bound = None
        payload, levels = activation["payload"], activation["topic"]
        for rule in self.rules[start:]:
            decided = rule._decide(payload, levels)
            if decided is not _ASK_CEL:
                if decided is not None:
                    return decided
                continue
            if bound is None:
                bound = _env().Activation(activation)
            failure = rule._judge(rule._program.eval(bound))
            if failure is not None:
                return failure
        return None


# cel-cpp's compile errors: "INVALID_ARGUMENT: ERROR: <input>:1:22: Syntax error: ...\n | src\n | ..^"
# (one ERROR per problem; line and column are 1-based).
_COMPILE_ERROR = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
# Evaluation errors start with an absl status code ("NOT_FOUND: ...") that means nothing to a rule author.
_STATUS = re.compile(r"^[A-Z_]+: ")
_NO_KEY = re.compile(r'Key not found in map : "(.*)"$')
_NO_OVERLOAD = re.compile(r"No matching overloads found : (.*)$")


def _compile_problem(text: str) -> tuple[str, int | None, int | None]:
    found = _COMPILE_ERROR.findall(text)
    if not found:
        return _STATUS.sub("", text, count=1).removesuffix(" [INVALID_ARGUMENT]"), None, None
    problems = [(line, column, _tidy(problem)) for line, column, problem in found]
    line, column, problem = problems[0]
    if len(problems) > 1:
        problem += (
            f" (and {len(problems) - 1} more: "
            + "; ".join(f"{ln}:{col}: {p}" for ln, col, p in problems[1:])
            + ")"
        )
    return problem, int(line), int(column)


def _tidy(problem: str) -> str:
    problem = problem.removesuffix(" [INVALID_ARGUMENT]")
    if problem.endswith(" (in container '')"):
        problem = (
            problem.removesuffix(" (in container '')") + f" (variables: {', '.join(_VARIABLES)})"
        )
    return problem


def _explain(error: object) -> str:
    text = _STATUS.sub("", str(error), count=1)
    if match := _NO_KEY.match(text):
        return f"no such key: {match[1]}"
    if match := _NO_OVERLOAD.match(text):
        signature = match[1]
        hint = ""
        if "int64" in signature and "double" in signature:
            hint = " (CEL does not mix int and double in arithmetic: write double(x))"
        return f"no operator or function for {signature}{hint}"
    return text
