"""The benchmark harness (`appliance bench`): how fast, how much CPU, how much memory.

It lives in the source tree, beside the `appliance` package rather than in it, and is not
shipped (the wheel and the Debian package leave it out): `appliance bench` finds it next to a
checkout's `appliance/`. The other measurements behind the docs are here too, each a
`python -m` module: `bench.drain` (the forwarder's drain rate), `bench.audit_store` (the audit
store's codec, seal, queries, ingest) and `bench.replay_rate` (replay over a generated recording).

Vocabulary:
- A *scenario* (scenarios.py) is a broker setup under test, started once for the whole benchmark:
  bare mosquitto (the reference every ratio is taken against), the appliance in front of its
  embedded mosquitto (optionally validating and forwarding to a cloud mosquitto), or a mosquitto
  bridge. It yields the port clients connect to, the pids to measure and the cloud port, if any.
- A *load* (load.py) is a message flow of demo readings (payloads.py), one in ten invalid: one
  mosquitto_pub publisher, or 100 sensors in 4 processes (sensors.py), flat out or at a fixed rate;
  one *run* is one load against one scenario, timed and then verified message by message.
- A *round* measures every scenario under every load once; ratios are taken within a round
  (runner.py). Round 0 is the warm-up.
- Two scenarios need no broker and run after the others: `replay` (replay_rate.py: `replay
  --against` over a generated recording) and `audit-sql` (audit_sql.py: `appliance audit sql`
  GROUP BY queries over generated Parquet verdicts), for issue #13's targets (targets.py).
"""

from bench.cli import bench
from bench.runner import BenchOptions, BenchReport, run_benchmark

__all__ = ["BenchOptions", "BenchReport", "bench", "run_benchmark"]
