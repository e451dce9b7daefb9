"""Measure the real MessageLog: what a sync policy costs in disk writes, ack latency and CPU.

    python -m appliance.msglog.measure --rate 1000 --seconds 5 --window-ms 0,5,20,50 --mode power_safe
    python -m appliance.msglog.measure --rate 0 --records 300000          # flat out, one appending thread

Records are ~150 bytes on disk (17-byte header + a verdict-like body around an 85-byte JSON payload),
appended from an asyncio event loop at a fixed rate; durability is reported back on that loop, as
in the service. Printed per policy: syncs/s, bytes written per payload byte (/proc/self/io
write_bytes: what this process made the kernel write, the figure `appliance bench` reports; with
--device, also the device's own count, which includes the file system's journal), ack latency
p50/p99 (append -> durable listener), fdatasync p50/p99, writer-thread CPU per record and the time
append() takes on the event loop. MSGLOG_DIR or --dir picks the file system.

--recycle on measures a warm, recycling log (docs/decisions/0006-segment-recycling.md): before the
timed run the log writes a whole segment flat out, seals it, removes it (kept as a free file) and
rolls again, so the timed records go into a reused segment, as they do once a running appliance
has removed its first segments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from .fileio import OsIO
from .log import MessageLog, SyncPolicy

PAYLOAD = b'{"device_id":"bench-q1-r1-s07","ts":"2026-11-27T12:00:00.123456Z","temperature":21.5}'
TOPIC = b"sensor/bench-q1-r1-s07/temperature"
_BODY_HEAD = struct.Struct("<qBBH")


def make_body(i: int) -> bytes:
    return _BODY_HEAD.pack(time.time_ns(), 1, i & 1, len(TOPIC)) + TOPIC + struct.pack("<I", len(PAYLOAD)) + PAYLOAD


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def device_bytes(device: str | None) -> int:
    if not device:
        return 0
    with open(f"/sys/block/{device}/stat") as f:
        return int(f.read().split()[6]) * 512


class TimedIO(OsIO):
    """The real I/O, with the time each fdatasync took."""

    def __init__(self) -> None:
        self.syncs: list[float] = []

    def fdatasync(self, fd: int) -> None:
        t = time.perf_counter()
        os.fdatasync(fd)
        self.syncs.append(time.perf_counter() - t)


def warm_up_recycling(log: MessageLog, segment_bytes: int) -> None:
    """Fill a segment, remove it (a free file) and roll: the active segment is then a reused one."""
    body = make_body(0)
    for _ in range(segment_bytes // (len(body) + 17) + 1):
        log.append(1, body)
    log.wait_durable(log.last_seq)
    log.seal()
    log.append(1, body)
    log.wait_durable(log.last_seq)
    log.seal()
    log.remove_segments_before(log.last_seq + 1)
    log.append(1, body)
    log.wait_durable(log.last_seq)
    log.seal()
    if log.stats["recycled"] < 1:
        raise RuntimeError("the warm-up did not reuse a segment")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def run_rate(base: Path, *, rate: int, seconds: float, policy: SyncPolicy, prealloc: str,
             device: str | None, recycle: bool = False) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="msglog-measure-", dir=base))
    try:
        io = TimedIO()
        segment_bytes = 16 << 20
        log = MessageLog(work / "log", policy=policy, preallocate=prealloc, io=io, segment_bytes=segment_bytes,
                         recycle=2 if recycle else 0)
        log.open()
        loop = asyncio.new_event_loop()
        n = int(rate * seconds)
        sent = [0.0] * (n + 2)
        latencies: list[float] = []
        first = [0]  # the seq before the timed records (the warm-up's last)
        acked = [0]
        done: asyncio.Future[None] = loop.create_future()

        def on_durable(seq: int) -> None:
            now = time.perf_counter()
            for s in range(max(acked[0], first[0]) + 1, seq + 1):
                latencies.append(now - sent[s - first[0]])
            acked[0] = max(acked[0], seq)
            if seq - first[0] >= n and not done.done():
                done.set_result(None)

        log.add_listener(on_durable)
        bodies = [make_body(i) for i in range(64)]
        append_time = [0.0]
        log.start(loop)
        assert log._thread is not None and log._thread.ident is not None
        writer_clock = time.pthread_getcpuclockid(log._thread.ident)
        if recycle:
            warm_up_recycling(log, segment_bytes)
            first[0] = acked[0] = log.last_seq
        if device:
            os.sync()  # the warm-up's and the directory's writes are not the timed run's
        io.syncs.clear()
        records0, syncs0, bytes0 = log.stats["records"], log.stats["syncs"], log.stats["bytes_appended"]

        async def produce() -> None:
            start = loop.time()
            for i in range(n):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                t = sent[i + 1] = time.perf_counter()
                log.append(1, bodies[i & 63])
                append_time[0] += time.perf_counter() - t
            await done

        w0, d0 = write_bytes(), device_bytes(device)
        c0 = time.clock_gettime(writer_clock)
        t0 = time.perf_counter()
        loop.run_until_complete(produce())
        elapsed = time.perf_counter() - t0
        writer_cpu = time.clock_gettime(writer_clock) - c0
        stats = log.stats
        syncs = list(io.syncs)
        log.stop()
        if device:
            os.sync()
        w1, d1 = write_bytes(), device_bytes(device)
        loop.close()
        payload = n * len(PAYLOAD)
        return {
            "syncs_per_s": (stats["syncs"] - syncs0) / elapsed,
            "bytes_per_payload_byte": (w1 - w0) / payload,
            "device_bytes_per_payload_byte": (d1 - d0) / payload if device else float("nan"),
            "record_bytes": (stats["bytes_appended"] - bytes0) / max(stats["records"] - records0, 1),
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "sync_p50_ms": percentile(syncs, 0.50) * 1000,
            "sync_p99_ms": percentile(syncs, 0.99) * 1000,
            "writer_cpu_us": writer_cpu / n * 1e6,
            "append_us": append_time[0] / n * 1e6,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_flat_out(base: Path, *, records: int, policy: SyncPolicy) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="msglog-measure-", dir=base))
    try:
        log = MessageLog(work / "log", policy=policy)
        log.open()
        log.start()
        bodies = [make_body(i) for i in range(64)]
        append = log.append
        t0 = time.perf_counter()
        c0 = time.thread_time()
        for i in range(records):
            append(1, bodies[i & 63])
        appended = time.perf_counter() - t0
        append_cpu = time.thread_time() - c0
        log.wait_durable(records)
        durable = time.perf_counter() - t0
        log.stop()
        return {"append_per_s": records / appended, "append_cpu_us": append_cpu / records * 1e6,
                "durable_per_s": records / durable, "syncs": log.stats["syncs"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000, help="records per second; 0 = flat out")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--records", type=int, default=300_000, help="flat out: how many records")
    ap.add_argument("--window-ms", default="0,5,20,50", help="power_safe windows to try (comma-separated)")
    ap.add_argument("--interval", type=float, default=1.0, help="os_buffered sync interval (s)")
    ap.add_argument("--max-pending-bytes", type=int, default=SyncPolicy().max_pending_bytes)
    ap.add_argument("--mode", default="power_safe", help="power_safe, os_buffered, or both comma-separated")
    ap.add_argument("--prealloc", default="none", help="none, fallocate, zeros, or several comma-separated")
    ap.add_argument("--recycle", default="off", help="off, on (a warm, recycling log), or off,on")
    ap.add_argument("--dir", default=os.environ.get("MSGLOG_DIR", "/var/tmp"))
    ap.add_argument("--device", default=None, help="block device under --dir (e.g. loop0) to count its writes too")
    args = ap.parse_args()
    base = Path(args.dir)
    if args.rate == 0:
        for mode in args.mode.split(","):
            r = run_flat_out(base, records=args.records, policy=SyncPolicy(mode=mode))
            print(f"flat out, {mode}: {r['append_per_s']:,.0f} appends/s ({r['append_cpu_us']:.2f} us CPU each), "
                  f"all durable at {r['durable_per_s']:,.0f} records/s, {r['syncs']} syncs")
        return
    print(f"rate {args.rate}/s for {args.seconds:g} s, payload {len(PAYLOAD)} B, dir {base}")
    print("| mode | window | prealloc | recycle | syncs/s | B written / payload B | device B / payload B "
          "| ack p50 / p99 (ms) | fdatasync p50 / p99 (ms) | writer CPU µs/record | append() µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.mode.split(","):
        windows = [float(w) for w in args.window_ms.split(",")] if mode == "power_safe" else [0.0]
        for window in windows:
            policy = SyncPolicy(mode=mode, window=window / 1000, interval=args.interval,
                                max_pending_bytes=args.max_pending_bytes)
            for prealloc in args.prealloc.split(","):
                for recycle in args.recycle.split(","):
                    r = run_rate(base, rate=args.rate, seconds=args.seconds, policy=policy, prealloc=prealloc,
                                 device=args.device, recycle=recycle == "on")
                    label = f"{window:g} ms" if mode == "power_safe" else f"sync every {args.interval:g} s"
                    print(f"| {mode} | {label} | {prealloc} | {recycle} | {r['syncs_per_s']:.0f} | "
                          f"{r['bytes_per_payload_byte']:.2f} | {r['device_bytes_per_payload_byte']:.2f} | "
                          f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['sync_p50_ms']:.2f} / {r['sync_p99_ms']:.2f} | "
                          f"{r['writer_cpu_us']:.1f} | {r['append_us']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
