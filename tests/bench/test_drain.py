"""The drain benchmark (python -m bench.drain) runs on the log-backed outbox and
accounts for every message it added."""

from __future__ import annotations

from bench.drain import run_benchmark


def test_a_small_drain_forwards_the_backlog_and_the_live_traffic():
    result = run_benchmark(backlog=2_000, live_rate=200, live_seconds_after=0.5, uvloop=False)
    assert result.backlog == 2_000
    assert result.live_forwarded > 0
    assert result.sent_total >= result.backlog + result.live_forwarded  # resends may add more
    assert result.drain_rate > 0 and result.drain_seconds > 0
