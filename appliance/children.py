"""Child processes of the appliance (mosquitto, helpers) die with it, even on kill -9."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent() -> None:
    """In the child (as preexec_fn): get SIGTERM when the appliance dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
