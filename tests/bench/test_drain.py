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


def test_a_drain_of_version_1_records_and_the_live_phase_cpu():
    """--records full: DECISION records as a log written before record version 2 holds them."""
    result = run_benchmark(backlog=1_000, live_rate=200, live_seconds_after=0.5, uvloop=False, compact=False)
    assert result.sent_total >= result.backlog + result.live_forwarded
    assert result.forwarder_cpu_us_per_message_live > 0
