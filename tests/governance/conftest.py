from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_set(tmp_path: Path):
    """A writable copy of a demo schema set: demo_set("v1") → its directory."""

    def copy(version: str = "v1") -> Path:
        target = tmp_path / version
        shutil.copytree(REPO / "schemas" / version, target)
        return target

    return copy
