"""File helpers every layer uses: hashing, atomic writes, safe file names.

One place each, at the bottom of the package (imports nothing from fedctl), so that writing a
file "never half-written" or hashing it means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: read size for hashing and copying files
BLOCK = 1 << 20


class BackgroundSHA256:
    """SHA-256 of pieces handed over in order, computed on a thread of its own while the caller
    writes or sends them (hashlib lets go of the GIL for large pieces, so the two overlap).

    A piece must not change until :meth:`hexdigest` returns. Use as a context manager, or call
    :meth:`hexdigest` (or :meth:`close`) in every path: the thread ends with it."""

    def __init__(self, depth: int = 8) -> None:
        import queue
        import threading

        self._h = hashlib.sha256()
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (piece := self._q.get()) is not None:
            self._h.update(piece)

    def update(self, piece: bytes | memoryview) -> None:
        """Hash ``piece`` after the ones before it."""
        self._q.put(piece)

    def hexdigest(self) -> str:
        """The hex digest of everything handed over (waits for the thread)."""
        if self._digest is None:
            self.close()
            self._digest = self._h.hexdigest()
        return self._digest

    def close(self) -> None:
        """Stop the thread (after what was handed over)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def __enter__(self) -> BackgroundSHA256:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644, durable: bool = False
) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename:
    readers see the old file or the new one, never a half-written one. ``durable`` fsyncs the
    file before the rename (for state that must survive a power cut)."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON data (indented, one trailing newline) atomically."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def safe_name(text: str, limit: int = 96) -> str:
    """``text`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced: a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:limit]
