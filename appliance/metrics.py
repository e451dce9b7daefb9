"""Prometheus metrics and health endpoints.

The hot path only bumps plain counters in `MetricsSink` (a dict increment, ~0.1 µs); everything is
turned into Prometheus metric families when Prometheus scrapes (`ApplianceCollector`), reading the
`Stats` snapshot the appliance takes then (a callable: the collector does not know the `Appliance`).
Every metric's name, type, labels and help are declared in appliance/names.py (`Metric`). Labels are
bounded: a topic filter of the schema set (or "none"), never a raw topic.

`MetricsServer` serves /metrics, /healthz and /readyz like an exporter: prometheus_client's own
threaded WSGI server (a request per thread, so a slow scrape does not hold up a health check), on
IPv4 or IPv6 (`[::1]:9100`), with the standard `process_*` and `python_*` metrics next to the
appliance's own and a `mqtt_proxy_build_info` gauge.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import socket
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from appliance.names import PROXY_COUNTED, Counted, Metric
from appliance.pipeline import CountingSink, Message, Policy, Verdict

log = logging.getLogger(__name__)

# Validation latency buckets, in seconds (the pipeline measures µs).
BUCKETS = (0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1)
_BUCKETS_US = [b * 1_000_000 for b in BUCKETS]


class MetricsSink(CountingSink):
    """Counts verdicts by outcome, topic filter and schema, and the time the checks took; and, as
    a CountingSink, by outcome alone with the last few kept (for `status` and tests). One sink,
    not two: every sink is a call per message on the event loop."""

    def __init__(self, keep: int = 20) -> None:
        super().__init__(keep)
        self.messages: Counter[tuple[str, str, str]] = Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum_us = 0

    def record(self, message: Message, verdict: Verdict, latency_us: int = 0, delivered: bool = True,
               policy: Policy | None = None) -> None:
        accepted = verdict.accepted
        self.counts["accept" if accepted else "reject"] += 1  # CountingSink.record, inline
        self.recent.append((message, verdict))
        self.messages[("valid" if accepted else "invalid", verdict.topic_filter or "none", verdict.schema or "none")] += 1
        self.buckets[bisect_left(_BUCKETS_US, latency_us)] += 1
        self.latency_sum_us += latency_us


def build_info() -> dict[str, str]:
    """What `mqtt_proxy_build_info` says about this installation."""
    try:
        version = metadata.version("mqtt-governance-appliance")
    except metadata.PackageNotFoundError:  # running from a checkout without installing it
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "machine": platform.machine()}


@dataclass(frozen=True, slots=True)
class AuditStats:
    quarantine_bytes: int
    pending_records: int
    lost_records: int
    healthy: bool
    log_syncs: int | None  # None when the log does not count them
    log_appended_bytes: int | None
    helper_failures: int


@dataclass(frozen=True, slots=True)
class UplinkStats:
    up: bool
    depth: int
    bytes: int
    oldest_age_s: float | None
    forwarded: int
    dropped: int


@dataclass(frozen=True, slots=True)
class DeadLetterStats:
    totals: Mapping[tuple[str, str], int]  # (destination, outcome) -> dead letters
    queue: int  # waiting for the local broker


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of the appliance's components, taken when Prometheus scrapes (on the metrics
    HTTP thread): plain values, so the collector knows nothing of the components themselves."""

    uptime_s: float
    state_dir: Path
    broker_up: bool
    broker_restarts: int
    clients: int
    reloads: Mapping[str, int]
    counts: Mapping[Counted, int]  # what the proxy counted, by (metric, label)
    audit: AuditStats | None = None
    uplink: UplinkStats | None = None
    dead_letters: DeadLetterStats | None = None


def make_registry(stats: Callable[[], Stats], sink: MetricsSink) -> CollectorRegistry:
    """The appliance's metrics plus what every exporter has: process_* (CPU, memory, open files,
    start time), python_info and python_gc_*."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(ApplianceCollector(stats, sink))
    return registry


def family(metric: Metric, value: float | None = None) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty family (add samples with labels) or, given `value`, one with its single sample."""
    spec = metric.value
    labels = list(spec.labels) if value is None else None
    if spec.type == "counter":
        return CounterMetricFamily(spec.name, spec.help, value=value, labels=labels)
    assert spec.type == "gauge", spec
    return GaugeMetricFamily(spec.name, spec.help, value=value, labels=labels)


class ApplianceCollector(Collector):
    def __init__(self, stats: Callable[[], Stats], sink: MetricsSink):
        self._stats = stats
        self._sink = sink
        info = build_info()
        self._build_info = [info[label] for label in Metric.BUILD_INFO.value.labels]

    def collect(self) -> Iterator[Any]:
        stats, sink = self._stats(), self._sink
        messages = family(Metric.MESSAGES)
        for (status, topic_filter, schema), count in list(sink.messages.items()):
            messages.add_metric([status, topic_filter, schema], count)
        yield messages
        cumulative, buckets = 0, []
        for bound, count in zip([*(str(b) for b in BUCKETS), "+Inf"], sink.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        duration = Metric.VALIDATION_DURATION.value
        yield HistogramMetricFamily(duration.name, duration.help, buckets=buckets, sum_value=sink.latency_sum_us / 1_000_000)
        build = family(Metric.BUILD_INFO)
        build.add_metric(self._build_info, 1)
        yield build
        yield family(Metric.UPTIME, stats.uptime_s)
        if (free := _free_bytes(stats.state_dir)) is not None:
            yield family(Metric.STATE_DIR_FREE, free)
        yield family(Metric.CONNECTION_STATUS, 1 if stats.broker_up else 0)
        yield family(Metric.CONNECTED_CLIENTS, stats.clients)
        yield family(Metric.BROKER_RESTARTS, stats.broker_restarts)
        reloads = family(Metric.CONFIG_RELOADS)
        for result in ("ok", "failed"):
            reloads.add_metric([result], stats.reloads.get(result, 0))
        yield reloads
        counted = {metric: family(metric) for metric in PROXY_COUNTED if metric.value.labels}
        unlabelled = dict.fromkeys((metric for metric in PROXY_COUNTED if not metric.value.labels), 0)
        for (metric, label), count in stats.counts.items():
            if metric in counted:
                counted[metric].add_metric([label], count)
            else:
                unlabelled[metric] += count
        yield from counted.values()
        for metric, count in unlabelled.items():
            yield family(metric, count)
        if (audit := stats.audit) is not None:
            yield family(Metric.QUARANTINE_SIZE, audit.quarantine_bytes)
            yield family(Metric.AUDIT_PENDING, audit.pending_records)
            yield family(Metric.AUDIT_LOST, audit.lost_records)
            yield family(Metric.AUDIT_HEALTHY, 1 if audit.healthy else 0)
            if audit.log_syncs is not None:
                yield family(Metric.LOG_SYNCS, audit.log_syncs)
            if audit.log_appended_bytes is not None:
                yield family(Metric.LOG_APPENDED, audit.log_appended_bytes)
            yield family(Metric.AUDIT_HELPER_FAILURES, audit.helper_failures)
        if (dead := stats.dead_letters) is not None:
            letters = family(Metric.DEAD_LETTERS)
            for (to, outcome), count in sorted(dead.totals.items()):
                letters.add_metric([to, outcome], count)
            yield letters
            yield family(Metric.DEAD_LETTER_QUEUE, dead.queue)
        if (uplink := stats.uplink) is not None:
            yield family(Metric.UPLINK_UP, 1 if uplink.up else 0)
            yield family(Metric.OUTBOX_MESSAGES, uplink.depth)
            yield family(Metric.OUTBOX_BYTES, uplink.bytes)
            yield family(Metric.OUTBOX_OLDEST_AGE, uplink.oldest_age_s or 0)
            yield family(Metric.FORWARDED, uplink.forwarded)
            yield family(Metric.DROPPED, uplink.dropped)


def _free_bytes(path: Path) -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's signature
        log.debug("metrics http: " + format, *args)


class MetricsPortInUse(OSError):
    """Another program already listens on the metrics address."""


# node_exporter's default port, taken on many gateways that already export host metrics.
NODE_EXPORTER_PORT = 9100


class MetricsServer:
    """/metrics, /healthz and /readyz on HOST:PORT, served from daemon threads."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], dict[str, Any]]):
        self._metrics: Callable[..., Iterable[bytes]] = make_wsgi_app(registry)
        self._ready = ready
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            report = self._ready()
            status = "200 OK" if report["ready"] else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(report).encode() + b"\n"]
        if path in ("/metrics", "/"):
            return self._metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def start(self, host: str, port: int) -> None:
        """Listen and serve; MetricsPortInUse (saying what to do) when the address is taken."""
        server_class = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": _family(host, port)})
        try:
            self._server = make_server(host, port, self._app, server_class=server_class, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortInUse(exc.errno, _in_use(host, port)) from exc
            raise
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", shown, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _family(host: str, port: int) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 address or a name that only resolves to one, else AF_INET."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return socket.AF_INET  # make_server reports the unknown name
    return infos[0][0]


def _in_use(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    message = f"{shown}:{port} is already in use by another program"
    if port == NODE_EXPORTER_PORT:
        message += (f" (port {port} is node_exporter's default: if it runs here, give the appliance another port, "
                    f"e.g. metrics.listen: 127.0.0.1:9101 or `--metrics-listen`)")
    else:
        message += "; set metrics.listen (or --metrics-listen) to a free port"
    return message
