"""Run a forwarder on its own over an existing outbox, e.g. to drain a journal by hand:

    python -m appliance.forward --journal STATE_DIR/audit/journal.sqlite3 \
        --upstream '{"url": "mqtts://broker:8883", "tls": {"ca_file": "ca.pem"}}'

`--upstream` is the `upstream:` config section as JSON. Events are printed as JSON lines; a status
line follows every `--status-every` seconds. SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path

from appliance.forward.config import UpstreamConfig
from appliance.forward.forwarder import Forwarder
from appliance.forward.outbox import Outbox


def _print(kind: str, detail: dict[str, object]) -> None:
    print(json.dumps({"event": kind, **detail}, default=str), flush=True)


async def _main(journal: Path, upstream: UpstreamConfig, status_every: float) -> None:
    outbox = Outbox(journal, upstream.outbox)
    forwarder = Forwarder(upstream, outbox, on_event=_print)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await forwarder.start()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), status_every)
            except TimeoutError:
                _print("status", dataclasses.asdict(forwarder.status()))
    finally:
        await forwarder.stop()
        _print("status", dataclasses.asdict(forwarder.status()))
        outbox.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m appliance.forward", description=__doc__.splitlines()[0])
    parser.add_argument("--journal", type=Path, required=True, help="the audit journal's SQLite file")
    parser.add_argument("--upstream", required=True, help="the upstream config section as JSON")
    parser.add_argument("--status-every", type=float, default=5.0, help="seconds between status lines")
    args = parser.parse_args(argv)
    upstream = UpstreamConfig.model_validate(json.loads(args.upstream))
    if not upstream.enabled:
        sys.exit("upstream.url is not set")
    asyncio.run(_main(args.journal, upstream, args.status_every))


if __name__ == "__main__":
    main()
