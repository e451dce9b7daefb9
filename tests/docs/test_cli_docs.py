"""docs/cli.md covers every command and option (metrics: tests/docs/test_names.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs import cli_reference

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = ROOT / "docs" / "cli.md"
REGENERATE = "regenerate it: python -m tests.docs.cli_reference > docs/cli.md"


def documented_sections() -> dict[str, str]:
    """Command name -> the text of its section in docs/cli.md."""
    text = CLI_DOC.read_text()
    sections: dict[str, str] = {}
    for match in re.finditer(r"^#{2,4} `([^`]+)`\n(.*?)(?=^#{2,4} `|\Z)", text, re.MULTILINE | re.DOTALL):
        sections[match.group(1)] = match.group(2)
    return sections


COMMANDS = [(name, command) for name, command, _ in cli_reference.commands()]


def test_every_command_is_documented():
    missing = [name for name, _ in COMMANDS if name not in documented_sections()]
    assert not missing, f"docs/cli.md lacks {missing}; {REGENERATE}"


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_option_is_documented(name: str, command):
    section = documented_sections().get(name, "")
    missing = [opt for opt in cli_reference.options(command) if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", section)]
    assert not missing, f"docs/cli.md, `{name}` lacks {missing}; {REGENERATE}"


def test_no_removed_command_lingers():
    stale = sorted(set(documented_sections()) - {name for name, _ in COMMANDS})
    assert not stale, f"docs/cli.md documents commands that no longer exist: {stale}; {REGENERATE}"
