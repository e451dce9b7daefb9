from __future__ import annotations

from pathlib import Path

from tests.chaos.crash import run


def test_repeated_kill_9_with_the_uplink_cut_at_random_loses_nothing_acknowledged(tmp_path: Path):
    outcome = run(tmp_path, rounds=4, seed=11)
    assert outcome.kills == 4
    assert len(outcome.accepted) > 2 * len(outcome.rejected) > 0  # about 4 in 5 readings are valid
