"""What is being measured: a broker setup the load generators connect to.

A scenario starts its processes in a work directory and yields a `Target`: the port clients connect
to, the pids to measure by role ("proxy", "mosquitto", "cloud"), and for scenarios that forward to a
second "cloud" mosquitto, the port a second subscriber connects to. Adding a scenario means adding one
class with a `name`, a `description` and a `start()` context manager, and listing it in `SCENARIOS`
(for an appliance with other settings, one more `ApplianceScenario(...)` entry is enough).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from bench import procfs
from bench.processes import (
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


# The demo schema sets: the checkout's schemas/ (this harness lives in the source tree, next to it),
# or where the Debian package installs them.
CHECKOUT = Path(__file__).resolve().parents[1]
_CHECKOUT_SCHEMAS = CHECKOUT / "schemas"
PACKAGED_SCHEMAS = Path("/usr/share/mqtt-appliance/schemas")
REPO_SCHEMAS = _CHECKOUT_SCHEMAS if _CHECKOUT_SCHEMAS.is_dir() else PACKAGED_SCHEMAS


@dataclass(frozen=True, slots=True)
class Target:
    port: int
    pids: dict[str, int]
    # The cloud broker that accepted messages are forwarded or bridged to, if any.
    cloud_port: int | None = None
    # The appliance's state dir, whose audit log counts the verdicts of a validating scenario.
    state_dir: Path | None = None
    # True when invalid messages are rejected (not delivered); their count comes from the audit log.
    validates: bool = False


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


@contextmanager
def _mosquitto(data_dir: Path, conf_text: str, port: int) -> Iterator[int]:
    """A mosquitto with this config; yields its pid once it accepts connections."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(conf_text)
    log = data_dir / "mosquitto.log"
    process = spawn_service([find_mosquitto(None), "-c", str(conf)], log=log)
    try:
        wait_until(lambda: accepts_connections(port), timeout=10, what=f"mosquitto start ({data_dir.name})",
                   alive=process, log=log)
        yield process.pid
    finally:
        stop(process)


@contextmanager
def cloud_mosquitto(workdir: Path) -> Iterator[tuple[int, int]]:
    """The "cloud" broker on loopback, configured like the reference: yields (port, pid)."""
    port = free_loopback_port()
    data_dir = workdir / "cloud"
    with _mosquitto(data_dir, render_mosquitto_conf(port=port, data_dir=data_dir, extra=BROKER_EXTRA_CONFIG), port) as pid:
        yield port, pid


def bridge_config(cloud_port: int) -> list[str]:
    """What a user writes to forward everything to a cloud broker: mosquitto's bridge, defaults otherwise."""
    return ["connection cloud", f"address 127.0.0.1:{cloud_port}", "topic # out 1"]


@dataclass(frozen=True)
class BridgeScenario:
    """What users run instead of the appliance: a local mosquitto bridging every topic to the cloud
    broker at QoS 1, no validation. Both brokers are configured like the reference."""

    name: str = "bridge"
    description: str = "mosquitto bridged to a cloud mosquitto (topic # out 1), no validation"

    @contextmanager
    def start(self, workdir: Path) -> Iterator[Target]:
        with cloud_mosquitto(workdir / self.name) as (cloud_port, cloud_pid):
            port = free_loopback_port()
            data_dir = workdir / self.name / "local"
            conf = render_mosquitto_conf(port=port, data_dir=data_dir, extra=[*BROKER_EXTRA_CONFIG, *bridge_config(cloud_port)])
            # The cloud broker is up first, so the bridge connects at once; each run's probe then
            # shows that messages actually flow through it.
            with _mosquitto(data_dir, conf, port) as pid:
                yield Target(port=port, pids={"mosquitto": pid, "cloud": cloud_pid}, cloud_port=cloud_port)


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
        port = free_loopback_port()
        if self.stock:
            conf = stock_mosquitto_conf(port)
        else:
            conf = render_mosquitto_conf(port=port, data_dir=data_dir, extra=BROKER_EXTRA_CONFIG)
        with _mosquitto(data_dir, conf, port) as pid:
            yield Target(port=port, pids={"mosquitto": pid})


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
    the proxy port. `settings` are merged into the generated config file. With `forward`, a cloud
    mosquitto is started first and `upstream.url` points at it."""

    name: str = "proxy"
    description: str = "appliance (accept-all pipeline) in front of its embedded mosquitto"
    settings: dict[str, Any] = field(default_factory=dict)
    forward: bool = False
    validates: bool = False

    @contextmanager
    def start(self, workdir: Path) -> Iterator[Target]:
        data_dir = workdir / self.name
        data_dir.mkdir(parents=True)
        with ExitStack() as stack:
            cloud: dict[str, Any] = {}
            if self.forward:
                cloud_port, cloud_pid = stack.enter_context(cloud_mosquitto(data_dir))
                cloud = {"cloud_port": cloud_port, "cloud_pid": cloud_pid}
            yield stack.enter_context(self._appliance(data_dir, **cloud))

    @contextmanager
    def _appliance(self, data_dir: Path, cloud_port: int | None = None, cloud_pid: int | None = None) -> Iterator[Target]:
        port = free_loopback_port()
        state_dir = data_dir / "state"
        config = _merge(
            {
                "listen": f"127.0.0.1:{port}",
                "state_dir": str(state_dir),
                "log_level": "warning",
                "metrics": {"enabled": False},
                "broker": {"extra_config": list(BROKER_EXTRA_CONFIG)},
            },
            self.settings,
        )
        if cloud_port is not None:
            config = _merge(config, {"upstream": {"url": f"mqtt://127.0.0.1:{cloud_port}"}})
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
            pids = {"proxy": process.pid, "mosquitto": brokers[0]}
            if cloud_pid is not None:
                pids["cloud"] = cloud_pid
            yield Target(port=port, pids=pids, cloud_port=cloud_port, state_dir=state_dir, validates=self.validates)
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
        # The relay alone (the foundation's budget): accept-all pipeline, no audit log.
        ApplianceScenario(settings={"audit": {"enabled": False}}),
        ApplianceScenario(
            name="governance",
            description="appliance with schemas/v1 (JSON Schema + CEL), audit with durable acks, "
            "forwarding to a cloud mosquitto",
            settings={"schemas": str(REPO_SCHEMAS / "v1"), "audit": {"enabled": True, "durable_acks": True}},
            forward=True,
            validates=True,
        ),
        BridgeScenario(),
    )
}
REFERENCE = "mosquitto"
STOCK_REFERENCE = "mosquitto-stock"
