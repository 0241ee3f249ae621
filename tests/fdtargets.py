"""What this test process's open file descriptors point at (Linux ``/proc``)."""

from __future__ import annotations

import os


def fd_targets() -> list[str]:
    """The path each open descriptor of this process refers to (``… (deleted)`` once removed)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, or one closed meanwhile
            continue
    return out
