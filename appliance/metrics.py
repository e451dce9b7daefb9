"""Prometheus metrics and health endpoints.

The hot path only bumps plain counters in `MetricsSink` (a dict increment, ~0.1 µs); everything is
turned into Prometheus metric families when Prometheus scrapes (`ApplianceCollector`), reading the
appliance's components as they are then. Labels are bounded: a topic filter of the schema set
(or "none"), never a raw topic.

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
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from appliance.pipeline import Message, Verdict

if TYPE_CHECKING:
    from appliance.app import Appliance

log = logging.getLogger(__name__)

# Validation latency buckets, in seconds (the pipeline measures µs).
BUCKETS = (0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1)
_BUCKETS_US = [b * 1_000_000 for b in BUCKETS]


class MetricsSink:
    """Counts verdicts by outcome, topic filter and schema, and the time the checks took."""

    def __init__(self) -> None:
        self.messages: Counter[tuple[str, str, str]] = Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum_us = 0

    def record(self, message: Message, verdict: Verdict, latency_us: int, delivered: bool = True) -> None:
        status = "valid" if verdict.accepted else "invalid"
        self.messages[(status, verdict.topic_filter or "none", verdict.schema or "none")] += 1
        self.buckets[bisect_left(_BUCKETS_US, latency_us)] += 1
        self.latency_sum_us += latency_us


def build_info() -> dict[str, str]:
    """What `mqtt_proxy_build_info` says about this installation."""
    try:
        version = metadata.version("mqtt-governance-appliance")
    except metadata.PackageNotFoundError:  # running from a checkout without installing it
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "machine": platform.machine()}


def make_registry(appliance: Appliance, sink: MetricsSink) -> CollectorRegistry:
    """The appliance's metrics plus what every exporter has: process_* (CPU, memory, open files,
    start time), python_info and python_gc_*."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(ApplianceCollector(appliance, sink))
    return registry


class ApplianceCollector(Collector):
    def __init__(self, appliance: Appliance, sink: MetricsSink):
        self._appliance = appliance
        self._sink = sink
        info = build_info()
        self._build_info = (list(info), list(info.values()))

    def collect(self) -> Iterator[Any]:
        app, sink = self._appliance, self._sink
        messages = CounterMetricFamily("mqtt_proxy_messages", "Messages judged, by outcome (valid/invalid), topic filter and schema.",
                                       labels=["status", "topic_filter", "schema"])
        for (status, topic_filter, schema), count in list(sink.messages.items()):
            messages.add_metric([status, topic_filter, schema], count)
        yield messages
        cumulative, buckets = 0, []
        for bound, count in zip([*(str(b) for b in BUCKETS), "+Inf"], sink.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("mqtt_proxy_validation_duration_seconds", "Time the pipeline's checks took per message.",
                                    buckets=buckets, sum_value=sink.latency_sum_us / 1_000_000)
        labels, values = self._build_info
        build = GaugeMetricFamily("mqtt_proxy_build_info", "Always 1; the labels say which release runs on which "
                                  "Python and machine.", labels=labels)
        build.add_metric(values, 1)
        yield build
        yield GaugeMetricFamily("mqtt_proxy_uptime_seconds", "Seconds since the appliance started.", value=app.uptime())
        if (free := _free_bytes(app.config.state_dir)) is not None:
            yield GaugeMetricFamily("mqtt_proxy_state_dir_free_bytes", "Bytes free for the appliance on the file system "
                                    "of its state dir (audit log, outbox).", value=free)
        broker_up = app.broker is not None and app.broker.endpoint() is not None
        yield GaugeMetricFamily("mqtt_proxy_connection_status", "1 while the broker behind the proxy accepts connections.",
                                value=1 if broker_up else 0)
        yield GaugeMetricFamily("mqtt_proxy_connected_clients", "Client connections open now.",
                                value=len(app.proxy.clients) if app.proxy else 0)
        yield CounterMetricFamily("mqtt_proxy_broker_restarts", "Times the embedded mosquitto was restarted.",
                                  value=app.broker.restarts if app.broker else 0)
        reloads = CounterMetricFamily("mqtt_proxy_config_reloads", "Config and schema set reloads, by result.", labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], app.reloads[result])
        yield reloads
        counters = app.proxy.counters if app.proxy is not None else {}
        families = {
            "limit_exceeded": CounterMetricFamily("mqtt_proxy_limit_exceeded", "Times a client hit a limit, by limit "
                                                  "(connections, connections_per_address, inflight, subscriptions, message_rate).",
                                                  labels=["limit"]),
            "auth_failures": CounterMetricFamily("mqtt_proxy_auth_failures", "Refused CONNECTs, by reason.", labels=["reason"]),
            "acl_denied": CounterMetricFamily("mqtt_proxy_acl_denied", "SUBSCRIBE filters the ACL denied (denied PUBLISHes "
                                              "are invalid messages with check acl).", labels=["action"]),
        }
        for key, count in list(counters.items()):
            name, _, label = key.partition(":")
            if name in families:
                families[name].add_metric([label], count)
        yield from families.values()
        audit = app.audit
        if audit is not None:
            yield GaugeMetricFamily("mqtt_proxy_quarantine_size_bytes",
                                    "Bytes of rejected payloads held in the quarantine (purges show at the next retention pass).",
                                    value=audit.quarantine_bytes)
            status = audit.status()
            yield GaugeMetricFamily("mqtt_proxy_audit_pending_records",
                                    "Records in the message log not yet converted to Parquet (approximate).",
                                    value=max(0, status["last_seq"] - status["converted_seq"]))
            yield CounterMetricFamily("mqtt_proxy_audit_lost_records", "Records that could not be made durable (full disk, I/O errors).",
                                      value=status["lost_records"])
            yield GaugeMetricFamily("mqtt_proxy_audit_healthy", "1 while the message log writes.", value=1 if status["healthy"] else 0)
            log_stats = status["log"]
            if "syncs" in log_stats:
                yield CounterMetricFamily("mqtt_proxy_log_syncs", "fdatasync calls of the message log.", value=log_stats["syncs"])
            if "bytes_appended" in log_stats:
                yield CounterMetricFamily("mqtt_proxy_log_appended_bytes", "Bytes appended to the message log.", value=log_stats["bytes_appended"])
            helper_failures = sum(entry["failures"] for entry in status["helpers"].values())
            yield CounterMetricFamily("mqtt_proxy_audit_helper_failures", "Helper processes (Parquet sealing, retention) that failed.",
                                      value=helper_failures)
        dead_letters = app.dead_letters
        if dead_letters is not None:
            family = CounterMetricFamily("mqtt_proxy_dead_letters", "Rejected messages republished to a dead-letter topic, "
                                         "by destination (local, cloud) and outcome.", labels=["to", "outcome"])
            for (to, outcome), count in sorted(dead_letters.totals().items()):
                family.add_metric([to, outcome], count)
            yield family
            yield GaugeMetricFamily("mqtt_proxy_dead_letter_queue", "Dead letters waiting for the local broker.",
                                    value=dead_letters.local_queue)
        forwarder = app.forwarder
        if forwarder is not None:
            status = forwarder.status()
            yield GaugeMetricFamily("mqtt_proxy_uplink_up", "1 while the cloud broker connection is up.", value=1 if status.uplink_up else 0)
            yield GaugeMetricFamily("mqtt_proxy_outbox_messages", "Messages waiting in the outbox.", value=status.depth)
            yield GaugeMetricFamily("mqtt_proxy_outbox_bytes", "Bytes of the messages waiting in the outbox (their records in the message log).", value=status.bytes)
            yield GaugeMetricFamily("mqtt_proxy_outbox_oldest_age_seconds", "Age of the oldest message in the outbox.",
                                    value=status.oldest_age_s or 0)
            yield CounterMetricFamily("mqtt_proxy_forwarded", "Messages the cloud broker acknowledged.", value=status.forwarded_total)
            yield CounterMetricFamily("mqtt_proxy_dropped", "Messages dropped from the outbox by its bounds.", value=status.dropped_total)


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
        self._metrics = make_wsgi_app(registry)
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
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
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
