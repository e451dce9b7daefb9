"""JSON Schema payloads, validated by jsonschema-rs (50x faster than python-jsonschema: docs/evidence.md).

Every `.json` file of a schema set is registered under a URI of its own
(`https://schema-set.invalid/<file path>`, or its `$id`), so `$ref` works between files of the set
and never reaches outside it. Drafts 4, 6, 7, 2019-09 and 2020-12 are picked from `$schema`;
`format` is always checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from appliance.governance.errors import SchemaError

BASE_URI = "https://schema-set.invalid/"
# Patterns without look-around or backreferences run on a linear-time engine. The others backtrack:
# one evaluation is bounded by this many steps (about 0.3 ms here), and a message checked against
# such a schema may hold at most MAX_STRINGS_WITH_BACKTRACKING strings (keys included), so one
# message costs at most about 0.1 s however it is crafted; more is rejected with a reason.
REGEX_BACKTRACK_LIMIT = 20_000
MAX_STRINGS_WITH_BACKTRACKING = 300
_BACKTRACKING = re.compile(r"\(\?<?[=!]|\\[1-9]|\\k<|\(\?>|[*+?}]\+")


def _utf8_error(payload: bytes) -> str:
    try:
        bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"payload is not valid UTF-8 (byte {exc.start})"
    return "payload is not valid UTF-8"


class JsonSchemaFileError(Exception):
    def __init__(self, file: str, message: str, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line


def _pointer(path: Iterable[Any]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


class JsonSchema:
    """A compiled JSON Schema: `validate(payload bytes)` → (decoded value, errors)."""

    format = "jsonschema"
    __slots__ = ("name", "file", "_validator", "_max_errors", "document", "max_strings")

    def __init__(self, name: str, file: str, validator: Any, document: Any, max_errors: int = 10):
        self.name = name
        self.file = file
        self.document = document
        self._validator = validator
        self._max_errors = max_errors
        self.max_strings = MAX_STRINGS_WITH_BACKTRACKING if uses_backtracking(document) else None

    def validate(self, payload: bytes) -> tuple[Any, list[SchemaError]]:
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            if isinstance(exc.__cause__, UnicodeDecodeError) or "UTF-8" in exc.msg:
                return None, [SchemaError("", _utf8_error(payload))]
            return None, [SchemaError("", f"not valid JSON: {exc}")]
        if self.max_strings is not None and _more_strings_than(value, self.max_strings):
            return None, [SchemaError("", f"more than {self.max_strings} strings: this schema has patterns that need "
                                          "backtracking (look-around or backreferences), which bounds a message's size")]
        if self._validator.is_valid(value):
            return value, []
        errors = []
        for error in self._validator.iter_errors(value):
            errors.append(SchemaError(_pointer(error.instance_path), error.message))
            if len(errors) >= self._max_errors:
                break
        return None, errors


def uses_backtracking(document: Any) -> bool:
    """Whether any `pattern` (or `patternProperties` key) needs the backtracking engine."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            pattern = node.get("pattern")
            if isinstance(pattern, str) and _BACKTRACKING.search(pattern):
                return True
            keys = node.get("patternProperties")
            if isinstance(keys, dict) and any(_BACKTRACKING.search(k) for k in keys):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _more_strings_than(value: Any, limit: int) -> bool:
    count = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            count += 1
        elif isinstance(node, dict):
            count += len(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        if count > limit:
            return True
    return False


class JsonSchemaRegistry:
    """All JSON documents of one schema set, for `$ref` between them."""

    def __init__(self, set_dir: Path, files: Iterable[Path]):
        self._dir = set_dir
        self.documents: dict[str, Any] = {}
        self.uris: dict[str, str] = {}
        resources = []
        for path in sorted(files):
            rel = path.relative_to(set_dir).as_posix()
            try:
                document = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise JsonSchemaFileError(rel, f"not valid JSON: {exc.msg}", exc.lineno) from exc
            except OSError as exc:
                raise JsonSchemaFileError(rel, f"cannot read: {exc.strerror}") from exc
            uri = BASE_URI + rel
            if isinstance(document, dict) and isinstance(document.get("$id"), str):
                uri = document["$id"]
            self.documents[rel] = document
            self.uris[rel] = uri
            resources.append((uri, document))
        try:
            self._registry = jsonschema_rs.Registry(resources)
        except (ValueError, jsonschema_rs.ReferencingError) as exc:
            raise JsonSchemaFileError(self._culprit(resources), f"{exc}".splitlines()[0]) from exc

    def _culprit(self, resources: list[tuple[str, Any]]) -> str:
        """Which file broke the registry (it resolves every $ref when built): the first one that
        fails when registered alone beside the valid others."""
        by_uri = {uri: rel for rel, uri in self.uris.items()}
        for uri, document in resources:
            try:
                jsonschema_rs.Registry([(uri, document)])
            except (ValueError, jsonschema_rs.ReferencingError):
                others = [r for r in resources if r[0] != uri]
                try:
                    jsonschema_rs.Registry(others)
                except (ValueError, jsonschema_rs.ReferencingError):
                    continue
                return by_uri[uri]
        return "."

    def compile(self, name: str, rel: str) -> JsonSchema:
        if rel not in self.documents:
            raise JsonSchemaFileError(rel, "no such JSON file in the schema set")
        document = self.documents[rel]
        try:
            validator = jsonschema_rs.validator_for(
                document,
                registry=self._registry,
                base_uri=self.uris[rel],
                validate_formats=True,
                pattern_options=jsonschema_rs.FancyRegexOptions(backtrack_limit=REGEX_BACKTRACK_LIMIT),
            )
        except jsonschema_rs.ValidationError as exc:
            where = _pointer(exc.instance_path) or "(root)"
            raise JsonSchemaFileError(rel, f"not a valid JSON Schema at {where}: {exc.message}") from exc
        except (ValueError, jsonschema_rs.ReferencingError) as exc:
            raise JsonSchemaFileError(rel, f"cannot compile: {exc}".splitlines()[0]) from exc
        return JsonSchema(name, rel, validator, document)
