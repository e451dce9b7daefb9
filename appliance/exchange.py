"""Files the running appliance hands to a command (`appliance audit export`, `replay`) through a
directory both can see: `STATE_DIR/exchange/<random>/`.

The two processes may not share /tmp (the shipped unit has PrivateTmp=yes), nor any path the caller
names (ProtectSystem=strict makes most of the file system read-only for the appliance), but both
see the state dir. The appliance creates the directory and writes there; the caller moves or reads
the files and removes it. (Interim: the message-log store lets callers read the files themselves.)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

EXCHANGE = "exchange"
STALE_AFTER_S = 24 * 3600  # a caller that died before removing its directory


def new_directory(state_dir: Path) -> Path:
    """(Appliance side.) A fresh private directory under STATE_DIR/exchange/."""
    root = state_dir / EXCHANGE
    root.mkdir(mode=0o700, exist_ok=True)
    for old in root.iterdir():
        try:
            if time.time() - old.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="export-", dir=root))


def export(state_dir: Path, *, since: str | None, until: str | None, timeout: float = 3600.0) -> tuple[Path, dict[str, Any]]:
    """(Caller side.) Ask the appliance running on `state_dir` to export into an exchange directory;
    returns it (the caller removes it) and the appliance's answer. Raises admin.AdminUnavailable
    or admin.AdminError like admin.call."""
    from appliance import admin

    answer = admin.call(state_dir, "export", timeout=timeout, exchange=True, since=since, until=until)
    return Path(answer["directory"]), answer


def move_tree(source: Path, destination: Path) -> list[Path]:
    """Move every file under `source` to the same place under `destination`; remove `source`."""
    moved = []
    try:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            moved.append(target)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return moved
