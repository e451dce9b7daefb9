"""The cookbook queries of docs/audit.md (`<!-- cookbook: NAME -->` before a ```sql block), one click
away on the SQL page. Read from the docs where this checkout or the Debian package keeps them, else
from the copy a wheel carries as package data (appliance/console/audit.md, a symlink to
docs/audit.md in the source tree)."""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path

PLACES = (
    Path(__file__).resolve().parents[2] / "docs" / "audit.md",  # a checkout
    Path("/usr/share/doc/mqtt-appliance/audit.md"),  # the Debian package
)
PACKAGED = "audit.md"  # package data of appliance.console (pyproject.toml)
_ENTRY = re.compile(r"<!-- cookbook: (?P<name>[\w-]+) -->\n```sql\n(?P<sql>.*?)```", re.DOTALL)


def parse(text: str) -> list[tuple[str, str, str]]:
    """(name, title, SQL) for each cookbook entry, in the order of the document; the title is the
    paragraph just before it (the name when a code block follows another)."""
    found = []
    for match in _ENTRY.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n\n", 1)[-1].strip()
        title = " ".join(before.split()).rstrip(":") if before and not before.endswith("```") else match["name"]
        found.append((match["name"], title, match["sql"].strip()))
    return found


@functools.cache
def queries() -> list[tuple[str, str, str]]:
    for place in (*PLACES, importlib.resources.files(__package__).joinpath(PACKAGED)):
        try:
            return parse(place.read_text(encoding="utf-8"))
        except OSError:
            continue
    return []
