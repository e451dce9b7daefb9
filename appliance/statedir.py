"""The state dir belongs to one running appliance: `claim()` checks that it can be written and
locks it (`STATE_DIR/appliance.lock`, flock) for as long as the process runs, so that a second
`appliance run` on it stops with a one-line error instead of failing somewhere inside."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

from appliance.msglog.fileio import OsIO

LOCK_NAME = "appliance.lock"


class StateDirError(Exception):
    """The state dir cannot be used; the message names it and says what to do."""


class StateDirBusy(StateDirError):
    """Another process (a running appliance) holds the state dir."""


def claim(state_dir: Path) -> IO[str]:
    """Create (if needed), check and lock the state dir; keep the returned file open while running."""
    try:
        # Created durably (each new directory fsync'd into its parent): a power cut right after the
        # first start must not take the state dir, and what was written into it, away.
        OsIO().makedirs(state_dir)
        with tempfile.TemporaryFile(dir=state_dir):
            pass
        lock = (state_dir / LOCK_NAME).open("a+")
    except OSError as exc:
        raise StateDirError(
            f"cannot write the state dir {state_dir}: {exc.strerror}; make it a directory the appliance's user "
            "can write, or choose another (state_dir, --state-dir)"
        ) from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StateDirBusy(
            f"the state dir {state_dir} is in use by another appliance (pid {holder}); stop that one, "
            "or give this one its own state dir (state_dir, --state-dir)"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
