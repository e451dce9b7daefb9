"""The docs keep up with the code: every setting has an entry."""

from __future__ import annotations

from pathlib import Path

from appliance.config import iter_settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_documented():
    text = (DOCS / "configuration.md").read_text()
    missing = [key for key, _ in iter_settings() if f"`{key}`" not in text]
    assert not missing, f"docs/configuration.md lacks: {missing}"


def test_every_setting_has_help():
    assert [key for key, info in iter_settings() if not info.description] == []
