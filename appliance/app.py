"""The appliance service: owns startup, the event loop and a graceful shutdown.

`Appliance` wires the configured broker, pipeline and proxy together. `run()` is what
`appliance run` calls: it picks the event loop (uvloop when available), handles SIGINT/SIGTERM and
returns the process exit code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import logging
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import sdnotify, statedir
from appliance.admin import AdminServer, socket_path
from appliance.audit.check import StoreUnavailable
from appliance.audit.errors import AuditError
from appliance.audit.operations import AuditOperations, forget_session
from appliance.audit.service import AuditService, forward_cursor_path
from appliance.broker import BrokerError, EmbeddedBroker, ExternalBroker, make_broker
from appliance.config import AuthConfig, Config, ConfigError, is_loopback, load_config
from appliance.deadletter.republisher import DeadLetterSink, Letter, LocalRepublisher, check_destinations
from appliance.forward import Forwarder, Outbox
from appliance.forward.check import OutboxFull
from appliance.governance import Governance, SchemaSetError, load_schema_set
from appliance.metrics import AuditStats, DeadLetterStats, MetricsPortInUse, MetricsServer, MetricsSink, Stats, UplinkStats, make_registry
from appliance.msglog import Cursor, LogClosed
from appliance.names import Counted, EventKind
from appliance.pipeline import Check, CountingSink, Pipeline, Policy, Sink
from appliance.proxy import ProxyServer, SessionLimits
from appliance.proxy.server import Listener
from appliance.reload import ReloadWatcher, needs_restart
from appliance.security import AccessError, AclCheck, Authenticator, PasswordFile, load_access
from appliance.security.tls import server_ssl_context

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The appliance cannot start: an address it should listen on is taken or unusable, or a
    listener's TLS files cannot be used. The message says which and what to do."""


def config_revision(config: Config, governance: Governance | None) -> str:
    """A short hash of the config and the schema set in force, recorded with every verdict."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    if governance is not None:
        digest.update(governance.schema_set.revision.encode())
    return digest.hexdigest()[:12]


def raise_open_file_limit() -> None:
    """Each client costs the appliance two descriptors (and mosquitto one): lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d: %s", soft, exc)


class Appliance:
    def __init__(
        self,
        config: Config,
        *,
        pipeline: Pipeline | None = None,
        config_path: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ):
        """Build the appliance; a broken schema set raises SchemaSetError here, before anything starts.
        `config_path` and `overrides` are what a reload reads again."""
        self.config = config
        # The config the appliance started with: settings that need a restart are compared with it,
        # so that reverting one (listen: B back to A) no longer asks for a restart.
        self.started_config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self._own_pipeline = pipeline is None
        self.watcher = ReloadWatcher(self.reload)
        self.metrics = MetricsSink(keep=20)
        self.verdicts: CountingSink = self.metrics  # the counts and the last few verdicts, for tests and `status`
        self.reloads: Counter[str] = Counter()
        self.dead_letters: DeadLetterSink | None = None  # republishes rejections (on_reject.republish)
        self.forwarder: Forwarder | None = None  # the store-and-forward client, when upstream.url is set
        self.outbox: Outbox | None = None
        self._outbox_check: OutboxFull | None = None
        self.metrics_server: MetricsServer | None = None
        self._started = time.monotonic()
        self.governance: Governance | None = None
        self.audit: AuditService | None = None
        # Who may connect and what they may do; built now so that a broken file stops the start.
        self.passwords, self.acl = load_access(config.auth)
        self.authenticators: list[Authenticator] = []
        self._store_check: StoreUnavailable | None = None
        if pipeline is None:
            if config.schemas is not None:
                schema_set = load_schema_set(config.schemas)
                check_destinations(schema_set, forwarding=config.upstream.url is not None)
                self.governance = Governance(schema_set)
            sinks: list[Sink] = [self.metrics]
            if config.audit.enabled:
                self.audit = AuditService(
                    config.audit, config.state_dir, on_event=self.on_event, forward=config.upstream.url is not None,
                )
                sinks.append(self.audit.sink)
                # Whatever durable_acks says: `false` means "do not wait for the sync", not
                # "acknowledge what a log known unable to write will lose".
                message_log = self.audit.log  # read directly: this runs for every QoS 1/2 PUBLISH
                self._store_check = StoreUnavailable(lambda: message_log.healthy)
            if config.upstream.url is not None:
                assert self.audit is not None  # the config requires it
                self.outbox = Outbox.for_log(self.audit.log, Cursor(forward_cursor_path(config.state_dir)), config.upstream.outbox)
                self.audit.keep_from = self.outbox.needed_from
                if config.upstream.outbox.policy == "reject_new":
                    self._outbox_check = OutboxFull(self.outbox)
            # After the audit sink: a dead letter names the verdict just recorded.
            audit_sink = self.audit.sink if self.audit is not None else None
            self.dead_letters = DeadLetterSink(
                local=LocalRepublisher(lambda: self.broker.endpoint() if self.broker is not None else None,
                                       on_drop=self._dead_letter_dropped),
                log=self.audit.log if self.outbox is not None and self.audit is not None else None,
                verdict_id=lambda: audit_sink.last_id if audit_sink is not None else None,
                on_event=self.on_event,
                cloud_full=self.outbox.is_full if self.outbox is not None else lambda: False,
            )
            sinks.append(self.dead_letters)
            pipeline = Pipeline(self._checks(self.governance), sinks, dry_run=config.dry_run,
                                revision=config_revision(config, self.governance))
        self.pipeline = pipeline
        self.broker: EmbeddedBroker | ExternalBroker | None = None
        self.proxy: ProxyServer | None = None
        self.admin: AdminServer | None = None
        self.events: list[tuple[str, dict[str, object]]] = []
        self._event_callbacks: list[Callable[[EventKind, dict[str, object]], None]] = []

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def ready(self) -> dict[str, object]:
        """What /readyz and `appliance status` report: ready when every part can do its job."""
        checks: dict[str, object] = {
            "broker": self.broker is not None and self.broker.endpoint() is not None,
            "listener": self.proxy is not None,
            "schema_set": self.governance.schema_set.version if self.governance is not None else "none (accept all)",
            "audit": self.audit.healthy if self.audit is not None else "disabled",
        }
        if self.forwarder is not None:
            # Informational: a gateway with its uplink down is still doing its job (it buffers).
            checks["uplink"] = "up" if self.forwarder.status().uplink_up else "down (buffering)"
        ready = all(value is not False for value in checks.values())
        return {"ready": ready, "checks": checks}

    def status(self) -> dict[str, object]:
        report = self.ready()
        report.update({
            "uptime_s": round(self.uptime(), 1),
            "clients": len(self.proxy.clients) if self.proxy else 0,
            "messages": dict(self.verdicts.counts),
            "broker_restarts": self.broker.restarts if self.broker else 0,
            "config_revision": self.revision,
            "reloads": dict(self.reloads),
        })
        if self.audit is not None:
            report["audit"] = self.audit.status()
        if self.forwarder is not None:
            report["uplink"] = dataclasses.asdict(self.forwarder.status())
        if self.dead_letters is not None and self.dead_letters.active:
            report["dead_letters"] = self.dead_letters.stats()
        return report

    def _dead_letter_dropped(self, letter: Letter, reason: str) -> None:
        verdict_id = None if letter.verdict_id is None else str(letter.verdict_id)
        self.on_event(EventKind.DEAD_LETTER_DROPPED,
                      {"verdict_id": verdict_id, "topic": letter.topic, "to": "local", "reason": reason})

    def stats(self) -> Stats:
        """What the metrics collector reports, as plain values (called on the metrics HTTP thread)."""
        broker, proxy, audit, forwarder = self.broker, self.proxy, self.audit, self.forwarder
        counts: Counter[Counted] = Counter()
        for key, count in list(proxy.counters.items()) if proxy is not None else ():
            counts[key] += count
        audit_stats = uplink = None
        if audit is not None:
            status = audit.status()
            log_stats = status["log"]
            audit_stats = AuditStats(
                quarantine_bytes=audit.quarantine_bytes,
                pending_records=max(0, status["last_seq"] - status["converted_seq"]),
                lost_records=status["lost_records"],
                healthy=bool(status["healthy"]),
                log_syncs=log_stats.get("syncs"),
                log_appended_bytes=log_stats.get("bytes_appended"),
                helper_failures=sum(entry["failures"] for entry in status["helpers"].values()),
            )
        if forwarder is not None:
            forwarding = forwarder.status()
            uplink = UplinkStats(up=forwarding.uplink_up, depth=forwarding.depth, bytes=forwarding.bytes,
                                 oldest_age_s=forwarding.oldest_age_s, forwarded=forwarding.forwarded_total,
                                 dropped=forwarding.dropped_total)
        dead_letters = None
        if self.dead_letters is not None:
            dead_letters = DeadLetterStats(totals=dict(self.dead_letters.totals()), queue=self.dead_letters.local_queue)
        return Stats(
            uptime_s=self.uptime(),
            state_dir=self.config.state_dir,
            broker_up=broker is not None and broker.endpoint() is not None,
            broker_restarts=broker.restarts if broker is not None else 0,
            clients=len(proxy.clients) if proxy is not None else 0,
            reloads=dict(self.reloads),
            counts=counts,
            audit=audit_stats,
            uplink=uplink,
            dead_letters=dead_letters,
        )


    @property
    def revision(self) -> str:
        """A short hash of the config and the schema set in force, recorded with every verdict."""
        return self.pipeline.policy.revision if self._own_pipeline else config_revision(self.config, self.governance)

    def _checks(self, governance: Governance | None) -> tuple[Check, ...]:
        """The checks in order: the store's health first (nothing is judged that cannot be
        recorded), the ACL, the schema set, the outbox's room."""
        return tuple(c for c in (self._store_check, self.acl, governance, self._outbox_check) if c is not None)

    def on_event(self, kind: EventKind, detail: dict[str, object]) -> None:
        log.debug("event %s %s", kind, detail)
        if self.audit is not None:
            try:
                self.audit.record_event(kind, detail)
            except LogClosed:
                # Reached the loop after the audit log stopped (its own log_degraded when its last
                # write fails on a full disk): the log line and the callbacks are all it gets.
                log.warning("event %s while the audit log is closed (stopped), not recorded: %s", kind, detail)
        for callback in self._event_callbacks:
            callback(kind, detail)

    def add_event_callback(self, callback: Callable[[EventKind, dict[str, object]], None]) -> None:
        """`callback(kind, detail)` on the event loop for every event (a "listener" is a socket here)."""
        self._event_callbacks.append(callback)

    async def start(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        raise_open_file_limit()
        self.broker = make_broker(config.broker, config.state_dir, on_event=self.on_event)
        if self.governance is not None:
            schema_set = self.governance.schema_set
            log.info("schema set %s from %s%s", schema_set.version, schema_set.directory, " (dry run: verdicts are recorded, everything is delivered)" if self.pipeline.dry_run else "")
        if self.audit is not None:
            await self.audit.start()
        if self.outbox is not None:
            self.forwarder = Forwarder(config.upstream, self.outbox, on_event=self.on_event)
            await self.forwarder.start()
        if config.metrics.enabled:
            self.metrics_server = MetricsServer(make_registry(self.stats, self.metrics), self.ready)
            try:
                self.metrics_server.start(config.metrics.listen.host, config.metrics.listen.port)
            except MetricsPortInUse as exc:
                raise StartupError(f"cannot serve metrics: {exc.strerror}") from exc
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {config.metrics.listen}: {exc.strerror} (set metrics.listen)") from exc
        listeners = self._listeners_from(config)
        await self.broker.start()
        limits = config.limits
        self.proxy = ProxyServer(
            listeners=listeners,
            pipeline=self.pipeline,
            endpoint=self.broker.endpoint,
            limits=SessionLimits(
                max_packet_size=limits.max_packet_size, max_connect_size=limits.max_connect_size,
                max_inflight=limits.max_inflight, max_subscriptions=limits.max_subscriptions,
                message_rate=limits.message_rate, message_burst=limits.message_burst,
            ),
            connect_timeout=limits.connect_timeout,
            max_connections=limits.max_connections,
            max_connections_per_address=limits.max_connections_per_address,
            write_buffer_high=limits.write_buffer_high,
            on_event=self.on_event,
            durability=self.audit.durability if self.audit is not None else None,
            access=self.acl,
        )
        if self.audit is not None:
            self.audit.add_settled_callback(self.proxy.committed)
            operations = AuditOperations(self.audit, self.pipeline, self.broker.endpoint)
            handlers = operations.handlers()
        else:
            handlers = {}
        handlers["status"] = self._status_op
        handlers["reload"] = self._reload_op
        handlers["clients"] = self._clients_op
        self.admin = AdminServer(socket_path(config.state_dir), handlers, refusals=(AuditError,))
        await self.admin.start()
        self.watcher.start(
            asyncio.get_running_loop(),
            config_file=self.config_path,
            schema_dir=config.schemas,
            watch=config.reload_on_change,
        )
        try:
            await self.proxy.start()
        except OSError as exc:
            await self.broker.stop()
            raise StartupError(f"cannot listen on {exc.strerror}") from exc

    @staticmethod
    def _anonymous_ok(auth: AuthConfig, loopback: bool) -> bool:
        return loopback if auth.allow_anonymous == "loopback" else bool(auth.allow_anonymous)

    def _listeners_from(self, config: Config) -> list[Listener]:
        listeners = []
        self.authenticators = []
        for spec in config.all_listeners():
            loopback = is_loopback(spec.listen.host)
            authenticator = Authenticator(self.passwords, allow_anonymous=self._anonymous_ok(config.auth, loopback), loopback=loopback)
            self.authenticators.append(authenticator)
            context = None
            if spec.tls is not None:
                try:
                    context = server_ssl_context(spec.tls)
                except AccessError as exc:
                    raise StartupError(f"listener {spec.listen}: TLS: {exc}") from exc
            listeners.append(Listener(spec.listen.host, spec.listen.port, context,
                                      spec.tls.use_identity_as_username if spec.tls else "none", authenticator,
                                      websocket_path=spec.websocket_path,
                                      allowed_origins=None if spec.allowed_origins is None
                                      else frozenset(o.lower() for o in spec.allowed_origins)))
        return listeners

    async def stop(self) -> None:
        self.watcher.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.proxy is not None:
            await self.proxy.stop()
        if self.dead_letters is not None:
            await self.dead_letters.stop()  # while the broker still takes what is queued
        if self.broker is not None:
            await self.broker.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        if self.outbox is not None:
            self.outbox.close()
        if self.audit is not None:
            await self.audit.stop()
        log.info("stopped")

    def status_line(self) -> str:
        """One line for `systemctl status`."""
        version = self.governance.schema_set.version if self.governance is not None else "none (accept all)"
        listen = f"{self.config.listen.host}:{self.proxy.port}" if self.proxy is not None and self.config.listen else "listeners"
        return f"serving MQTT on {listen}; schema set {version}; revision {self.revision}"

    async def reload(self, reason: str = "request") -> bool:
        """Load the config and schema set again and swap them in, or keep the old ones (see reload.py)."""
        sdnotify.notify(sdnotify.reloading())
        try:
            return await self._reload(reason)
        finally:
            sdnotify.notify(f"READY=1\nSTATUS={self.status_line()}")

    async def _reload(self, reason: str) -> bool:
        try:
            config = load_config(self.config_path, self.overrides) if self.config_path is not None else self.config
            schema_set = await asyncio.to_thread(load_schema_set, config.schemas) if config.schemas is not None else None
            if schema_set is not None:
                check_destinations(schema_set, forwarding=self.outbox is not None)
            passwords, acl = await asyncio.to_thread(load_access, config.auth)
        except (ConfigError, SchemaSetError, AccessError) as exc:
            self.reloads["failed"] += 1
            log.error("reload (%s) failed; the running config and schema set stay in force:\n%s", reason, exc)
            self.on_event(EventKind.CONFIG_RELOAD, {"result": "failed", "reason": reason, "error": str(exc)})
            return False
        restart = needs_restart(self.started_config, config)
        governance = self.governance
        if self._own_pipeline:
            governance = Governance(schema_set, previous=self.governance) if schema_set is not None else None
        # From here to the policy swap nothing awaits: no message is judged in between, and each one
        # is judged and recorded under the old policy or the new one, whole.
        self.config = config
        self.governance = governance
        # Password file, ACL and allow_anonymous take effect for the next CONNECT / SUBSCRIBE / PUBLISH.
        self.passwords = passwords
        self.acl.rules = acl.rules
        for authenticator in self.authenticators:
            authenticator.passwords = passwords
            authenticator.allow_anonymous = self._anonymous_ok(config.auth, authenticator.loopback)
        if self._own_pipeline:
            self.pipeline.policy = Policy(self._checks(governance), config.dry_run, config_revision(config, governance))
        logging.getLogger().setLevel(config.log_level.upper())
        self.watcher.watch_schemas(config.schemas)
        # Then access withdrawn by the new files is revoked (this awaits the broker).
        await self._revoke_withdrawn_access()
        self.reloads["ok"] += 1
        version = schema_set.version if schema_set is not None else None
        if restart:
            log.warning("reloaded (%s); these settings changed but take effect only after a restart: %s", reason, ", ".join(restart))
        else:
            log.info("reloaded (%s): schema set %s, revision %s", reason, version, self.revision)
        self.on_event(EventKind.CONFIG_RELOAD, {"result": "ok", "reason": reason, "schema_set": version,
                                        "revision": self.revision, "needs_restart": restart})
        return True

    async def _revoke_withdrawn_access(self) -> None:
        """After a reload: close clients whose user left the password file or whose granted
        subscriptions the ACL now refuses, and discard their broker sessions (a persistent session
        would otherwise keep the subscriptions across the reconnect)."""
        if self.proxy is None or self.broker is None:
            return
        endpoint = self.broker.endpoint()
        for leg in list(self.proxy.clients):
            session = leg.session
            if session is None or session.client is None:
                continue
            reason = None
            if self.passwords is not None and session.password_user is not None \
                    and session.password_user not in self.passwords.entries:
                reason = f"user {session.password_user!r} is no longer in the password file"
            elif denied := session.denied_subscriptions():
                reason = f"no longer allowed to read {denied[0]!r}"
            if reason is None:
                continue
            log.warning("closing %s: %s", session.describe(), reason)
            leg.revoke(reason)
            self.on_event(EventKind.ACCESS_REVOKED, {"client_id": session.client.client_id, "peer": session.peer, "reason": reason})
            if endpoint is not None and session.broker_client_id:
                try:
                    await forget_session(endpoint, session.broker_client_id)
                except (OSError, TimeoutError) as exc:
                    log.warning("could not discard the broker session of %s: %s", session.describe(), exc)

    async def _reload_op(self, request: dict[str, object]) -> dict[str, object]:
        return {"reloaded": await self.reload("admin request")}

    async def _status_op(self, request: dict[str, object]) -> dict[str, object]:
        return {"status": self.status()}

    async def _clients_op(self, request: dict[str, object]) -> dict[str, object]:
        """The connected clients, for the console's Clients page (its audit figures come from the log)."""
        clients = []
        for leg in list(self.proxy.clients) if self.proxy is not None else []:
            session = leg.session
            if session is not None and session.client is not None:
                client = session.client
                clients.append({"client_id": client.client_id, "username": client.username, "peer": client.peer,
                                "protocol": int(client.protocol_version)})
        return {"clients": clients}

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set or SIGINT/SIGTERM arrives, then shut down gracefully."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        watchdog: asyncio.Task[None] | None = None
        try:
            await self.start()
            # Collect start-up garbage first: frozen objects are never collected again, so garbage
            # frozen now would stay for the life of the process.
            gc.collect()
            gc.freeze()
            sdnotify.notify(f"READY=1\nSTATUS={self.status_line()}")
            if (interval := sdnotify.watchdog_interval()) is not None:
                watchdog = asyncio.create_task(sdnotify.feed_watchdog(interval), name="systemd-watchdog")
            await stop.wait()
            log.info("shutting down")
        finally:
            sdnotify.notify("STOPPING=1\nSTATUS=shutting down")
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await self.stop()
            if watchdog is not None:
                watchdog.cancel()


SWITCH_INTERVAL_S = 0.001


def run(config: Config, *, config_path: Path | None = None, overrides: dict[str, Any] | None = None) -> None:
    """Run the appliance in the foreground; raises StartupError, BrokerError, SchemaSetError,
    AccessError, StateDirError or AuditError when it cannot start."""
    sdnotify.claim_environment()  # before mosquitto starts: it must not inherit $NOTIFY_SOCKET
    # The message log's writer and the forwarder run Python next to the event loop; a thread that wants
    # the GIL waits up to the switch interval (5 ms by default). 1 ms cut the latency tails at
    # 1k msg/s (max 5.1-5.8 -> 2.7-4.5 ms local, cloud p99 3.6-4.3 -> 2.5-3.7 ms; 3 A/B pairs) with
    # no measurable change in throughput (docs/performance.md).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with statedir.claim(config.state_dir):  # the lock is held until the appliance has stopped
        _serve(Appliance(config, config_path=config_path, overrides=overrides), config)


def _serve(appliance: Appliance, config: Config) -> None:
    if config.use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using the default asyncio event loop")
        else:
            uvloop.run(appliance.serve())
            return
    asyncio.run(appliance.serve())
