"""Drain-rate benchmark: a backlog in the outbox, live traffic arriving at a steady rate, and a
forwarder draining both to a mosquitto on loopback.

    python -m bench.drain --backlog 50000 --live-rate 1000

Reports the drain rate (messages acknowledged per second while the backlog drains, live traffic
included), how much faster than the ingest rate that is, and the bytes written to disk per message
(appends and syncs by the message log's writer thread plus the forwarder's cursor saves, from
/proc/self/io write_bytes, so page-cache writeback done later by the kernel for this process counts
too), and the forwarder thread's CPU time per message.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.audit.records import (
    COMPACT_DECISION,
    CONNECTION,
    CONTEXT,
    DECISION,
    IdClock,
    encode_compact,
    payload_sha256,
    varint,
)
from appliance.config.upstream import UpstreamConfig
from appliance.forward.forwarder import Forwarder
from appliance.forward.outbox import Outbox
from appliance.msglog.cursor import Cursor
from appliance.msglog.log import EpochChanged, MessageLog


@dataclass(frozen=True)
class DrainResult:
    backlog: int
    live_rate: float
    window: int
    payload_bytes: int
    protocol: int
    drain_seconds: float
    drain_rate: float  # messages acknowledged per second until the backlog was gone (live ones included)
    ratio_to_ingest: float
    live_forwarded: int
    bytes_written_per_message_backlog: float  # log appends in large batches, plus cursor saves
    bytes_written_per_message_live: float  # log syncs at the live rate (small batches), plus cursor saves
    sent_total: int
    forwarder_cpu_us_per_message: float  # the forwarder thread (log reads, index, MQTT), whole run
    forwarder_cpu_us_per_message_live: float  # the same, live phase only (after the drain, at the live rate)
    cursor_saves: int


def _write_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sync_and_bytes() -> int:
    os.sync()  # so writes still in the page cache are counted now, not at some later writeback
    return _write_bytes()


async def _run(directory: Path, *, backlog: int, live_rate: float, live_seconds_after: float, window: int,
               payload_bytes: int, protocol: int, compact: bool = True) -> DrainResult:
    port = _free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                    "set_tcp_nodelay true\nmax_queued_messages 0\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
        [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    message_log = MessageLog(directory / "log")
    message_log.open()
    message_log.start(loop)
    clock = IdClock()
    payload = b"x" * payload_bytes
    digest = payload_sha256(payload)
    sensors = [f"sensor-{i}" for i in range(20)]
    added = 0
    encode, code = DECISION.encode, DECISION.code
    refs: dict[str, bytes] = {}  # client -> its connection and context records' seqs (this epoch)
    epoch = -1

    def append_compact(client: str, now: float) -> int:
        # What the audit sink writes since record version 2: definitions once per segment, then
        # compact decisions referring to them.
        nonlocal epoch
        while True:
            if message_log.epoch != epoch:
                epoch = message_log.epoch
                refs.clear()
            try:
                ref = refs.get(client)
                if ref is None:
                    connection = message_log.append(CONNECTION.code, CONNECTION.encode(
                        (client, None, "127.0.0.1:1", 5)), epoch)
                    context = message_log.append(CONTEXT.code, CONTEXT.encode(
                        (f"plant/{client}/reading", "v1", "reading", "v1", "plant/+/reading", "bench", False, 1)), epoch)
                    ref = refs[client] = varint(connection) + varint(context)
                return message_log.append(COMPACT_DECISION, encode_compact(
                    clock.next(now), now, ref, 1, False, payload, len(payload), None, "accept", 0, "[]", 10, False,
                    None, True, True), epoch)
            except EpochChanged:
                continue

    def add(count: int) -> int:
        nonlocal added
        seq = 0
        for _ in range(count):
            client = sensors[added % len(sensors)]
            now = time.time()
            if compact:
                seq = append_compact(client, now)
            else:
                seq = message_log.append(code, encode((
                    clock.next(now), now, client, None, "127.0.0.1:1", 5, f"plant/{client}/reading", 1, False,
                    payload, len(payload), digest, "v1", "reading", "v1", "plant/+/reading", "accept", 0, "[]", 10,
                    "bench", False, False, None, True, 1, True)))
            added += 1
        return seq

    async def committed(seq: int) -> None:
        while message_log.durable_seq < seq:
            await asyncio.sleep(0.001)

    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.02)
        before = _sync_and_bytes()
        for start in range(0, backlog, 5_000):
            await committed(add(min(5_000, backlog - start)))

        config = UpstreamConfig.model_validate({"url": f"mqtt://127.0.0.1:{port}", "window": window, "protocol": protocol,
                                                "client_id": "bench", "gateway_id": "bench"})
        cursor = _CountingCursor(directory / "forward.cursor")
        outbox = Outbox.for_log(message_log, cursor, config.outbox)
        forwarder = Forwarder(config, outbox, on_event=lambda kind, detail: None)
        stop_live = asyncio.Event()

        async def live() -> None:
            tick = 0.01
            per_tick = live_rate * tick
            owed = 0.0
            next_at = time.monotonic()
            while not stop_live.is_set():
                owed += per_tick
                whole = int(owed)
                owed -= whole
                if whole:
                    add(whole)
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        started = time.monotonic()
        await forwarder.start()
        assert forwarder._thread is not None  # noqa: SLF001
        thread_id = forwarder._thread.native_id  # noqa: SLF001
        live_task = asyncio.create_task(live())
        while forwarder.forwarded_total < backlog:
            await asyncio.sleep(0.005)
        drain_seconds = time.monotonic() - started
        drained = forwarder.forwarded_total
        drain_rate = drained / drain_seconds
        # Steady state with live traffic only: bytes per message at the live rate.
        live_before_bytes = _sync_and_bytes()
        live_before_count = forwarder.forwarded_total
        live_before_cpu = _thread_cpu(thread_id)
        await asyncio.sleep(live_seconds_after)
        stop_live.set()
        await live_task
        await committed(message_log.last_seq)
        while outbox.depth().messages:
            await asyncio.sleep(0.01)
        cpu = _thread_cpu(thread_id)
        live_count = forwarder.forwarded_total - live_before_count
        live_cpu = cpu - live_before_cpu
        live_bytes = _sync_and_bytes() - live_before_bytes
        await forwarder.stop()
        total_bytes = _sync_and_bytes() - before
        outbox.close()
        backlog_bytes = total_bytes - live_bytes
        return DrainResult(
            backlog=backlog, live_rate=live_rate, window=window, payload_bytes=payload_bytes, protocol=protocol,
            drain_seconds=round(drain_seconds, 3), drain_rate=round(drain_rate),
            ratio_to_ingest=round(drain_rate / live_rate, 1) if live_rate else float("inf"),
            live_forwarded=live_count,
            bytes_written_per_message_backlog=round(backlog_bytes / max(1, forwarder.forwarded_total - live_count)),
            bytes_written_per_message_live=round(live_bytes / max(1, live_count)),
            sent_total=forwarder.sent_total,
            forwarder_cpu_us_per_message=round(cpu / max(1, forwarder.forwarded_total) * 1e6, 1),
            forwarder_cpu_us_per_message_live=round(live_cpu / max(1, live_count) * 1e6, 1),
            cursor_saves=cursor.saves,
        )
    finally:
        message_log.stop()
        broker.terminate()
        broker.wait(10)


class _CountingCursor(Cursor):
    saves = 0

    def save(self, seq: int) -> None:
        self.saves += 1
        super().save(seq)


def _thread_cpu(native_id: int | None) -> float:
    """CPU seconds of one thread of this process, from /proc: its run time in nanoseconds
    (schedstat), else user + system in clock ticks (10 ms: too coarse for a few seconds)."""
    try:
        return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_benchmark(*, backlog: int = 50_000, live_rate: float = 1_000, live_seconds_after: float = 5.0, window: int = 100,
                  payload_bytes: int = 150, protocol: int = 5, uvloop: bool = True, compact: bool = True) -> DrainResult:
    with tempfile.TemporaryDirectory(prefix="forward-bench-") as tmp:
        kwargs: dict[str, Any] = {"backlog": backlog, "live_rate": live_rate, "live_seconds_after": live_seconds_after,
                                  "window": window, "payload_bytes": payload_bytes, "protocol": protocol,
                                  "compact": compact}
        if uvloop:
            import uvloop as _uvloop

            return _uvloop.run(_run(Path(tmp), **kwargs))
        return asyncio.run(_run(Path(tmp), **kwargs))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--live-rate", type=float, default=1_000)
    parser.add_argument("--live-seconds", type=float, default=5.0, help="live-only phase after the drain (bytes/message)")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--payload", type=int, default=150)
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=5)
    parser.add_argument("--records", choices=("compact", "full"), default="compact",
                        help="compact decisions with their definitions (what the appliance writes since record "
                             "version 2) or full DECISION records (version 1)")
    args = parser.parse_args()
    result = run_benchmark(backlog=args.backlog, live_rate=args.live_rate, live_seconds_after=args.live_seconds,
                           window=args.window, payload_bytes=args.payload, protocol=args.protocol,
                           compact=args.records == "compact")
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
