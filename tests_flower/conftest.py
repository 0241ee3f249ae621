"""Shared helpers of the Flower suite (``make test-flower``: its own virtual environment)."""

from __future__ import annotations

import socket
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
