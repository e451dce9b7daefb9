"""Run a forwarder on its own over a message log, e.g. to drain a stopped appliance's log by hand:

    python -m appliance.forward --log STATE_DIR/log --cursor STATE_DIR/forward.cursor \
        --upstream '{"url": "mqtts://broker:8883", "tls": {"ca_file": "ca.pem"}}'

`--upstream` is the `upstream:` config section as JSON. Without a writer in this process, every
complete record on disk counts as stored: run it over the log of an appliance that is stopped (or
accept that a record the appliance has not synced yet may be forwarded). New records are picked up
every 10 ms. Events are printed as JSON lines; a status line follows every `--status-every` seconds.
SIGTERM or SIGINT stops it gracefully (the cursor is saved).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path

from appliance.config.upstream import UpstreamConfig
from appliance.forward.forwarder import Forwarder
from appliance.forward.outbox import SAVE_EVERY, SAVE_INTERVAL_S, Outbox
from appliance.msglog.cursor import Cursor


def _print(kind: str, detail: dict[str, object]) -> None:
    print(json.dumps({"event": kind, **detail}, default=str), flush=True)


async def _main(args: argparse.Namespace, upstream: UpstreamConfig) -> None:
    outbox = Outbox(args.log, upstream.outbox, cursor=Cursor(args.cursor), save_interval=args.save_interval,
                    save_every=args.save_every)
    forwarder = Forwarder(upstream, outbox, on_event=_print)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await forwarder.start()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.status_every)
            except TimeoutError:
                _print("status", dataclasses.asdict(forwarder.status()))
    finally:
        await forwarder.stop()
        _print("status", dataclasses.asdict(forwarder.status()))
        outbox.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m appliance.forward", description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="the message log's directory")
    parser.add_argument("--cursor", type=Path, required=True, help="the forwarder's cursor file")
    parser.add_argument("--upstream", required=True, help="the upstream config section as JSON")
    parser.add_argument("--status-every", type=float, default=5.0, help="seconds between status lines")
    parser.add_argument("--save-interval", type=float, default=SAVE_INTERVAL_S, help="seconds between cursor saves at most")
    parser.add_argument("--save-every", type=int, default=SAVE_EVERY, help="acknowledgements that force a cursor save")
    args = parser.parse_args(argv)
    upstream = UpstreamConfig.model_validate(json.loads(args.upstream))
    if not upstream.enabled:
        sys.exit("upstream.url is not set")
    asyncio.run(_main(args, upstream))


if __name__ == "__main__":
    main()
