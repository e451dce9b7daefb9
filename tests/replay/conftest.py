from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from replay.cli import cli

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "schemas" / "v1"
V2 = REPO / "schemas" / "v2"


@pytest.fixture
def run() -> Callable[..., Result]:
    """`replay ARGS...` in-process, as the console script runs it; stdout and stderr apart."""

    def invoke(*args: Any) -> Result:
        return CliRunner().invoke(cli, [str(a) for a in args], prog_name="replay", catch_exceptions=False)

    return invoke
