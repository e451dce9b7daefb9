"""Repeated `kill -9` under load with the uplink cut at random (tests/chaos/crash.py): a few rounds
here; `make chaos` runs 50 (docs/performance.md, "Long runs")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.crash import Outcome, check, check_message_ids, run


def test_repeated_kill_9_with_the_uplink_cut_at_random_loses_nothing_acknowledged(
        tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    outcome = run(tmp_path, rounds=4, seed=11)
    # Reported with the test (JUnit XML properties; -rA shows the summary): at-least-once, so
    # duplicates are expected after a kill, and run() asserted that each is explained.
    for name in ("kills", "uplink_cuts", "received", "in_cloud", "duplicates", "duplicated", "most_copies"):
        record_property(name, getattr(outcome, name))
    record_property("summary", outcome.summary())
    print(outcome.summary())
    assert outcome.kills == 4
    # One message at a time per publisher (3): at most one left unacknowledged by each kill.
    assert len(outcome.unacknowledged) <= 3 * outcome.kills, outcome.summary()
    assert len(outcome.accepted) > 2 * len(outcome.rejected) > 0, outcome.summary()  # about 4 in 5 readings are valid
    assert outcome.received == outcome.in_cloud + outcome.duplicates >= len(outcome.accepted), outcome.summary()


def _verdicts(accepted: set[bytes], rejected: set[bytes]) -> dict[bytes, list[str]]:
    return {**{p: ["accept"] for p in accepted}, **{p: ["reject"] for p in rejected}}


def test_the_end_state_check_finds_each_kind_of_loss_and_leak() -> None:
    """check() itself, on hand-made end states: it is what makes the chaos run a test."""
    outcome = Outcome(accepted={b"a1", b"a2"}, rejected={b"r1"}, unacknowledged={b"u1", b"u2"})
    verdicts = {**_verdicts({b"a1", b"a2", b"u1"}, {b"r1"})}
    check(outcome, {b"a1", b"a2", b"u1"}, verdicts)  # u1 stored and forwarded before the kill: fine

    with pytest.raises(AssertionError, match="1 messages acknowledged with a reject code reached the cloud"):
        check(outcome, {b"a1", b"a2", b"r1"}, verdicts)
    with pytest.raises(AssertionError, match="acknowledged with a success code are not in the cloud"):
        check(outcome, {b"a1"}, verdicts)
    with pytest.raises(AssertionError, match="neither acknowledged as accepted nor waiting"):
        check(outcome, {b"a1", b"a2", b"x"}, {**verdicts, b"x": ["accept"]})
    with pytest.raises(AssertionError, match="in the cloud do not have exactly one 'accept' verdict"):
        check(outcome, {b"a1", b"a2", b"u2"}, verdicts)  # u2 reached the cloud with no verdict recorded
    with pytest.raises(AssertionError, match="success code do not have exactly one 'accept' verdict"):
        check(outcome, {b"a1", b"a2"}, {**verdicts, b"a2": ["accept", "accept"]})  # recorded twice
    with pytest.raises(AssertionError, match="reject code do not have exactly one 'reject' verdict"):
        check(outcome, {b"a1", b"a2"}, {b"a1": ["accept"], b"a2": ["accept"]})


def test_every_copy_must_carry_its_verdicts_id_as_message_id() -> None:
    ids = {b"a": 7, b"b": 8}
    check_message_ids({b"a": {"7"}, b"b": {"8"}}, ids)  # a duplicate of b carrying "8" again: fine
    with pytest.raises(AssertionError, match="1 of 2 messages"):
        check_message_ids({b"a": {"7"}, b"b": {"8", "9"}}, ids)  # one copy re-recorded under another id
    with pytest.raises(AssertionError, match="1 of 1 messages"):
        check_message_ids({b"a": {None}}, ids)  # no message-id at all
