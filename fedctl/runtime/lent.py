"""Model files a site agent has given its client script, kept until the script lets them go.

The script maps a task's model file copy-on-write (its tensors are views of the page cache) and
may keep those tensors as long as it likes (a module-level cache, the previous round's model).
The agent keeps each such file under its name until the script says it no longer maps it (its
``released`` list, sent with its next message); the file is then retired
(:func:`fedctl._fs.retire`): a later download overwrites it in place instead of filling a new
file's pages. A file the script held when it forked is removed instead (a child may map it).
Only files the agent lent are retired, whatever the script sends; when the script ends, the
files it still held are removed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from fedctl._fs import remove_soon, retire


class LentFiles:
    """The model files lent to one job's script (see the module docstring)."""

    def __init__(self) -> None:
        self._files: dict[str, Path] = {}
        self._lock = threading.Lock()

    def lend(self, path: Path) -> None:
        """``path`` is given to the script: keep it until it is released."""
        with self._lock:
            self._files[str(path)] = path

    def returned(self, released: Iterable[str] | None, dropped: Iterable[str] | None) -> None:
        """The script no longer maps these files: retire the ``released`` ones it was lent,
        remove the ``dropped`` ones (a process it forked may map them). Names it was not lent
        are ignored: a script cannot make the agent retire or remove anything else."""
        with self._lock:
            keep = [self._files.pop(n) for n in released or () if n in self._files]
            drop = [self._files.pop(n) for n in dropped or () if n in self._files]
        for path in keep:
            retire(path)
        for path in drop:
            remove_soon(path)

    def drop(self) -> None:
        """The script ended (or the job did): remove every lent file. Not retired: a process
        the script forked could outlive it and still map one."""
        with self._lock:
            paths, self._files = list(self._files.values()), {}
        for path in paths:
            remove_soon(path)

    def __len__(self) -> int:
        return len(self._files)
