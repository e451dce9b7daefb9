"""What is being measured: a broker setup the load generators connect to.

A scenario starts its processes in a work directory and yields a `Target`: the port clients connect
to and the pids to measure, by role ("proxy", "mosquitto"). Adding a scenario means adding one
class with a `name`, a `description` and a `start()` context manager, and listing it in `SCENARIOS`
(for an appliance with other settings, one more `ApplianceScenario(...)` entry is enough).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from appliance.bench import procfs
from appliance.bench.processes import (
    BenchError,
    accepts_connections,
    spawn_service,
    stop,
    wait_until,
)
from appliance.broker import find_mosquitto, free_loopback_port, render_mosquitto_conf

# mosquitto drops QoS 1 messages for a client once 1,000 are queued (max_queued_messages): a
# subscriber that falls behind would lose messages and fail the run. Both brokers queue without limit.
BROKER_EXTRA_CONFIG = ["max_queued_messages 0"]


@dataclass(frozen=True, slots=True)
class Target:
    port: int
    pids: dict[str, int]


class Scenario(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    def start(self, workdir: Path) -> Any:
        """A context manager that yields a running `Target` and stops everything on exit."""


def stock_mosquitto_conf(port: int) -> str:
    """What a user runs without the appliance: Debian's defaults (notably set_tcp_nodelay false)."""
    return "\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true", *BROKER_EXTRA_CONFIG]) + "\n"


@dataclass(frozen=True)
class MosquittoScenario:
    """The reference: a bare mosquitto configured like the appliance's embedded one (`stock=False`),
    or with the distribution's defaults (`stock=True`), which is what users run without us."""

    name: str = "mosquitto"
    description: str = "bare mosquitto, configured like the embedded one; clients connect directly"
    stock: bool = False

    @contextmanager
    def start(self, workdir: Path) -> Iterator[Target]:
        data_dir = workdir / self.name
        data_dir.mkdir(parents=True)
        port = free_loopback_port()
        conf = data_dir / "mosquitto.conf"
        if self.stock:
            conf.write_text(stock_mosquitto_conf(port))
        else:
            conf.write_text(render_mosquitto_conf(port=port, data_dir=data_dir, extra=BROKER_EXTRA_CONFIG))
        log = data_dir / "mosquitto.log"
        process = spawn_service([find_mosquitto(None), "-c", str(conf)], log=log)
        try:
            wait_until(lambda: accepts_connections(port), timeout=10, what="mosquitto start", alive=process, log=log)
            yield Target(port=port, pids={"mosquitto": process.pid})
        finally:
            stop(process)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = [*merged[key], *value]
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class ApplianceScenario:
    """`appliance run` as its own process in front of its embedded mosquitto; clients connect to
    the proxy port. `settings` are merged into the generated config file."""

    name: str = "proxy"
    description: str = "appliance (accept-all pipeline) in front of its embedded mosquitto"
    settings: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def start(self, workdir: Path) -> Iterator[Target]:
        data_dir = workdir / self.name
        data_dir.mkdir(parents=True)
        port = free_loopback_port()
        config = _merge(
            {
                "listen": f"127.0.0.1:{port}",
                "state_dir": str(data_dir / "state"),
                "log_level": "warning",
                "metrics": {"enabled": False},
                "broker": {"extra_config": list(BROKER_EXTRA_CONFIG)},
            },
            self.settings,
        )
        config_file = data_dir / "appliance.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        log = data_dir / "appliance.log"
        process = spawn_service([sys.executable, "-m", "appliance", "run", "--config", str(config_file)], log=log)
        try:
            # The proxy listens only once its mosquitto accepts connections (Appliance.start).
            wait_until(lambda: accepts_connections(port), timeout=30, what="appliance start", alive=process, log=log)
            brokers = [pid for pid in procfs.child_pids(process.pid) if procfs.command_name(pid) == "mosquitto"]
            if len(brokers) != 1:
                raise BenchError(f"expected one mosquitto child of the appliance (pid {process.pid}), found {brokers}")
            yield Target(port=port, pids={"proxy": process.pid, "mosquitto": brokers[0]})
        finally:
            stop(process)


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        MosquittoScenario(),
        MosquittoScenario(
            name="mosquitto-stock",
            description="bare mosquitto with Debian's default settings (set_tcp_nodelay false)",
            stock=True,
        ),
        ApplianceScenario(),
    )
}
REFERENCE = "mosquitto"
STOCK_REFERENCE = "mosquitto-stock"
