"""`$ref` resolution over the JSON documents of one schema set, the way the appliance registers them.

Every `.json` file of a set is known as `https://schema-set.invalid/<path>` or by its top-level
`$id` (appliance/governance/jsonschemas.py), so a reference resolves against the referring file's
URI. Supported: JSON-pointer fragments (`#/$defs/x`, `common.json#/$defs/id`), whole documents and
`$anchor`s. Not supported (the caller reports "could not analyse $ref"): `$id`s embedded below the
top level of a file, `$dynamicRef`/`$recursiveRef`, anything outside the set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urljoin

from appliance.governance.jsonschemas import BASE_URI


class Documents:
    """The JSON documents of one schema set, by URI."""

    def __init__(self, directory: Path | None):
        self._by_uri: dict[str, Any] = {}
        self._uri_of: dict[str, str] = {}
        if directory is None:
            return
        for path in sorted(Path(directory).rglob("*.json")):
            rel = path.relative_to(directory).as_posix()
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                continue  # the loader refuses such a set; a ref to it simply stays unresolved
            self.add(rel, document)

    def add(self, rel: str, document: Any) -> None:
        uri = BASE_URI + rel
        if isinstance(document, dict) and isinstance(document.get("$id"), str):
            uri = urldefrag(urljoin(BASE_URI + rel, document["$id"])).url
        self._by_uri[uri] = document
        self._uri_of[rel] = uri

    def uri_of(self, rel: str) -> str:
        return self._uri_of.get(rel, BASE_URI + rel)

    def resolve(self, base: str, ref: str) -> tuple[Any, str, str] | None:
        """(target schema, the URI its own refs resolve against, a key naming it) or None."""
        if not isinstance(ref, str):
            return None
        target = urljoin(base, ref)
        uri, fragment = urldefrag(target)
        document = self._by_uri.get(uri)
        if document is None:
            return None
        if not fragment:
            return document, uri, uri + "#"
        if fragment.startswith("/"):
            node = document
            for token in fragment[1:].split("/"):
                token = unquote(token).replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and token in node:
                    node = node[token]
                elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                    node = node[int(token)]
                else:
                    return None
            return node, uri, f"{uri}#{fragment}"
        for node in _subschemas(document):
            if node.get("$anchor") == fragment:
                return node, uri, f"{uri}#{fragment}"
        return None


def _subschemas(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
