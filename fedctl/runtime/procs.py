"""Stopping the processes fedctl starts: a process group, politely first."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def terminate_group(proc: subprocess.Popen[bytes] | int, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (a Popen or a PID), SIGKILL it after ``grace`` s.

    Every process fedctl starts leads its own group (``start_new_session``), so this also ends
    whatever that process started.
    """
    pid = proc if isinstance(proc, int) else proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    if _wait(proc, grace):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _wait(proc, 5.0)


def _wait(proc: subprocess.Popen[bytes] | int, timeout: float) -> bool:
    """True once the process has ended (within ``timeout``)."""
    if not isinstance(proc, int):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    import psutil

    try:
        psutil.Process(proc).wait(timeout)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True
