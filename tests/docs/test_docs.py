"""The docs keep up with the code: every setting has an entry."""

from __future__ import annotations

import re
from pathlib import Path

from appliance.config import iter_settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_documented():
    text = (DOCS / "configuration.md").read_text()
    missing = [key for key, _ in iter_settings() if f"`{key}`" not in text]
    assert not missing, f"docs/configuration.md lacks: {missing}"


def test_every_setting_has_help():
    assert [key for key, info in iter_settings() if not info.description] == []


REPO = DOCS.parent
# `docs/x.md`, `../x.md` and bare `X.md` citations in the docs, the README and code comments.
_CITATION = re.compile(r"(?<![\w/.-])((?:\.\./)*(?:[\w-]+/)*[\w-]+\.md)\b")


def _cited(path: Path) -> list[str]:
    return [m.group(1) for m in _CITATION.finditer(path.read_text(encoding="utf-8"))]


def test_every_cited_markdown_file_is_in_the_repository():
    sources = [REPO / "README.md", *DOCS.rglob("*.md"), *(REPO / "appliance").rglob("*.py"), *(REPO / "replay").rglob("*.py")]
    missing = []
    for source in sources:
        if source.name in ("journal.py",):  # storage internals being replaced (issue 13)
            continue
        for cited in _cited(source):
            candidates = [REPO / cited, source.parent / cited, DOCS / cited]
            if not any(candidate.resolve().is_file() for candidate in candidates):
                missing.append(f"{source.relative_to(REPO)}: {cited}")
    assert missing == []


def test_protobuf_is_not_described_under_the_json_schema_heading():
    text = (DOCS / "schemas.md").read_text()
    json_section = text.split("## JSON Schema", 1)[1].split("\n## ", 1)[0]
    assert ".proto" not in json_section
    assert "\n## Protobuf\n" in text


def test_the_readme_names_every_simulated_fault():
    from appliance.simulate import STATUS_FAULTS, TEMPERATURE_FAULTS

    readme = (REPO / "README.md").read_text()
    assert [kind for kind in (*TEMPERATURE_FAULTS, *STATUS_FAULTS) if f"`{kind}`" not in readme] == []
