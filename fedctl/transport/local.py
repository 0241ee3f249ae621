"""Private unix sockets on this machine (a site agent and its script, a server and its jobs).

Socket paths live in a per-process folder of mode 0700 in the temporary folder (removed at exit;
a killed process's folder by the next one that makes its own, see :func:`fedctl._fs.private_dir`),
because unix socket paths are limited to 108 bytes and cannot live deep inside a workspace; each
socket is created with mode 0600, so only this user can connect.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

from fedctl._fs import private_dir, safe_name
from fedctl.errors import UsageError

_socket_dir: Path | None = None
#: bytes of a unix socket's path on Linux (108 with the terminating NUL)
SUN_PATH_MAX = 107
#: a socket's name keeps at least this many of its last characters (where names differ)
MIN_NAME = 16


def socket_path(name: str) -> Path:
    """A path for a unix socket in this process's private folder; the name keeps its last
    characters, as many as the path's limit leaves room for (60 at most)."""
    global _socket_dir
    if _socket_dir is None:
        _socket_dir = private_dir(tempfile.gettempdir())
        atexit.register(shutil.rmtree, _socket_dir, True)
    room = SUN_PATH_MAX - len(os.fsencode(_socket_dir)) - len("/.sock")
    if room < MIN_NAME:
        raise UsageError(
            f"the temporary folder {tempfile.gettempdir()} is too long a path for unix sockets "
            f"(at most {SUN_PATH_MAX} bytes each); set TMPDIR to a shorter folder, such as /tmp"
        )
    # counted in bytes (a letter may take several); a letter cut at the start is dropped
    tail = safe_name(name).encode()[-min(60, room) :].decode(errors="ignore")
    return _socket_dir / f"{tail}.sock"


def listen_unix(path: Path, backlog: int = 16) -> socket.socket:
    """A listening unix socket at ``path`` that only this user can connect to (mode 0600)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock
