"""Child processes of the appliance (mosquitto, helper processes)."""

from __future__ import annotations

import ctypes
import os
import signal


def prepare_child() -> None:
    """In the child (as preexec_fn): its own process group, so that a terminal's Ctrl-C (SIGINT to
    the foreground group) reaches the appliance only, which then stops its children itself; and
    SIGTERM when the appliance dies, even by kill -9 (Linux only). (uvloop takes neither
    process_group nor start_new_session together with a preexec_fn.)"""
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
