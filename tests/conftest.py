from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Config, load_config
from tests.helpers import RunningAppliance


def make_config(state_dir: Path, **overrides: object) -> Config:
    values: dict[str, object] = {"listen": "127.0.0.1:0", "state_dir": str(state_dir), "log_level": "debug",
                                 "metrics.listen": "127.0.0.1:0"}
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "state", **{"limits.connect_timeout": 1.0})


@pytest.fixture
def appliance(config: Config) -> Iterator[RunningAppliance]:
    running = RunningAppliance(config).start()
    try:
        yield running
    finally:
        running.stop()
