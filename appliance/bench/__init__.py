"""The benchmark harness (`appliance bench`): how fast, how much CPU, how much memory.

Vocabulary:
- A *scenario* (scenarios.py) is a broker setup under test, started once for the whole benchmark:
  bare mosquitto (the reference every ratio is taken against) or the appliance in front of its
  embedded mosquitto. It yields the port clients connect to and the pids to measure.
- A *load* (load.py) is a message flow driven by mosquitto_pub / mosquitto_sub; one *run* is one
  load against one scenario, timed and then verified message by message.
- A *round* measures every scenario under every load once; ratios are taken within a round
  (runner.py). Round 0 is the warm-up.
"""

from appliance.bench.cli import bench
from appliance.bench.runner import BenchOptions, BenchReport, run_benchmark

__all__ = ["BenchOptions", "BenchReport", "bench", "run_benchmark"]
