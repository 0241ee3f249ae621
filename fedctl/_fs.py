"""File helpers every layer uses: hashing, atomic writes, safe file names.

One place each, at the bottom of the package (imports nothing from fedctl), so that writing a
file "never half-written" or hashing it means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
import time
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


#: a ``fedctl-<pid>-*`` folder whose process is gone is removed once unchanged this long (s)
STALE_AFTER = 3600


def private_dir(root: str | os.PathLike[str]) -> Path:
    """A new folder of mode 0700 in ``root``, named ``fedctl-<pid>-*`` after this process, for
    files that only live as long as it does (model files in /dev/shm, unix sockets in /tmp). A
    process killed before it could remove its folder leaves it behind: such folders of this
    user in ``root`` are removed first (:func:`remove_stale`)."""
    root = Path(root)
    remove_stale(root)
    return Path(tempfile.mkdtemp(prefix=f"fedctl-{os.getpid()}-", dir=root))


def remove_stale(root: Path) -> list[Path]:
    """Remove this user's ``fedctl-<pid>-*`` folders in ``root`` whose process is gone and that
    nothing changed for :data:`STALE_AFTER` seconds (left when a process was killed with no
    chance to clean up). A folder whose PID is alive (or, in another PID namespace, merely
    looks dead but is in use), or not this user's, is kept. Returns what it removed."""
    import shutil

    removed = []
    now = time.time()
    for folder in root.glob("fedctl-*-*"):
        pid = folder.name.split("-")[1]
        try:
            st = folder.lstat()  # a symbolic link is not a folder here: it is never followed
            if (
                not pid.isdigit()
                or not stat.S_ISDIR(st.st_mode)
                or st.st_uid != os.getuid()
                or now - st.st_mtime < STALE_AFTER
                or _alive(int(pid))
            ):
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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


#: files at least this big have their blocks freed on a thread of their own by remove_soon
SLOW_REMOVE_BYTES = 64 * 1024 * 1024
#: seconds remove_soon keeps a removed file open before letting its blocks go: a mapping of it
#: dropped meanwhile does not free them (and wait) in the thread that drops it
REMOVE_HOLD = 2.0
_reaper: Any = None  # the queue of remove_soon's thread, once started
_reaper_lock = threading.Lock()


def remove_soon(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` (its name goes now), freeing a large file's blocks on another thread.

    Freeing the blocks of a large file can take seconds of waiting on the disk: ext4 mounted with
    ``discard`` trims them before ``unlink`` returns (2.4 GB transfer files, every round). The
    file is kept open, its name removed at once, and the last close, which frees the blocks,
    happens :data:`REMOVE_HOLD` seconds later on a daemon thread. A missing file is no error.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError:  # not a regular file we may read: remove it the plain way
        Path(path).unlink(missing_ok=True)
        return
    try:
        big = os.fstat(fd).st_size >= SLOW_REMOVE_BYTES
        Path(path).unlink(missing_ok=True)
    except BaseException:
        os.close(fd)
        raise
    if not big:
        os.close(fd)
        return
    close_soon(fd)


def close_soon(fd: int) -> None:
    """Close ``fd`` :data:`REMOVE_HOLD` seconds from now on :func:`remove_soon`'s thread (the
    last reference to a removed file: freeing its blocks waits there, not here)."""
    try:
        jobs = _reaper_queue()
    except RuntimeError:  # no new thread at interpreter shutdown: free it here
        os.close(fd)
        return
    jobs.put((time.monotonic() + REMOVE_HOLD, fd))


def _reaper_queue() -> Any:
    """The queue of (close at, fd) of the one daemon thread that closes removed files."""
    global _reaper
    with _reaper_lock:
        if _reaper is None:
            import queue

            jobs: queue.Queue[tuple[float, int]] = queue.Queue()

            def run() -> None:
                while True:
                    at, fd = jobs.get()
                    time.sleep(max(0.0, at - time.monotonic()))
                    try:
                        os.close(fd)
                    except OSError:
                        pass

            threading.Thread(target=run, name="fedctl-remove", daemon=True).start()
            _reaper = jobs
        return _reaper


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON data (indented, one trailing newline) atomically."""
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def safe_name(text: str, limit: int = 96) -> str:
    """``text`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced: a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:limit]


# ---------------------------------------------------------------------- spare transfer files
#
# Writing a new multi-gigabyte file allocates every page of it in the page cache (and its blocks
# on disk), and freeing it gives them all back: on this project's 2-core VM a new file costs
# about 1.2 CPU seconds per GB written, overwriting one whose pages are still cached 0.12. A
# folder set up with enable_spares keeps the transfer files nothing reads any more (retire) and
# hands them to the next writer (open_new), which overwrites one in place and renames it: the
# written file is still never seen half-written.

#: the folder (inside a transfer folder) that holds its spare files
SPARE_DIR = ".spare"
#: a retired file smaller than this is removed, not kept
SPARE_MIN_BYTES = SLOW_REMOVE_BYTES
#: at most this many spares are kept in one folder; more are removed
SPARE_LIMIT = 4
#: a file is kept as a spare only while this share of the machine's memory would stay available
#: (free, or page cache the kernel can take back): a spare that only pushes pages out that are
#: needed (and is then pushed out itself) saves nothing
SPARE_FREE_MARGIN = 0.125
#: a file is kept as a spare only while its filesystem keeps this share of its size free, plus
#: room for two more files as large: spares trade disk for speed, and a site's next transfer
#: must never fail for want of the disk they hold (a 2.2 GiB model's POC of a server and two
#: sites peaked at 33.5 GiB of disk with spares in every folder)
SPARE_DISK_MARGIN = 0.10


def enable_spares(folder: str | os.PathLike[str]) -> None:
    """Let ``folder`` keep retired transfer files for reuse (until :func:`drop_spares`)."""
    (Path(folder) / SPARE_DIR).mkdir(parents=True, exist_ok=True)


def retire(path: str | os.PathLike[str]) -> None:
    """Done with the transfer file ``path``, which nothing maps or reads any more: keep it as a
    spare of its folder if the folder keeps spares and it is large, else :func:`remove_soon` it.

    Only a file whose every reader is gone may be retired: the next writer overwrites it in
    place, which a mapping of it would see."""
    path = Path(path)
    spares = path.parent / SPARE_DIR
    try:
        size = path.stat().st_size
        if size >= SPARE_MIN_BYTES and spares.is_dir():  # small files never ask about memory
            if not _disk_has_room(spares, size):
                # the disk is short: this folder's spares go too, not only the file
                for name in os.listdir(spares):
                    remove_soon(spares / name)
            elif (
                size <= _available_memory() - SPARE_FREE_MARGIN * _total_memory()
                and len(os.listdir(spares)) < SPARE_LIMIT
            ):
                os.replace(path, spares / f"{os.getpid()}-{time.monotonic_ns()}")
                return
    except FileNotFoundError:  # no such file, or the folder keeps no spares (or no more)
        pass
    remove_soon(path)


def _disk_has_room(folder: Path, size: int) -> bool:
    """Whether ``folder``'s filesystem may keep a spare of ``size`` bytes: it has
    :data:`SPARE_DISK_MARGIN` of its size free and room for two more such files."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free >= SPARE_DISK_MARGIN * total + 2 * size


def _pages(name: str) -> int:
    """A sysconf page count in bytes (the kernel's MemTotal or MemFree; 0 where unknown)."""
    try:
        return max(os.sysconf(name), 0) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _available_memory() -> int:
    """Bytes the kernel can hand out without swapping: its MemAvailable, free memory and the
    page cache it can take back (where the kernel does not tell: free memory, else unlimited).

    Not free memory alone: on a machine that has run a while the page cache fills nearly all of
    it, and spares were then never kept (bench_large's sites kept none after round 1)."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _pages("SC_AVPHYS_PAGES") or 1 << 62


def _total_memory() -> int:
    return _pages("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory in bytes: on Linux one read (2 µs) of ``/proc/self/statm``
    through a descriptor kept open per process, as the simulator asks before and after every
    per-round script; psutil elsewhere."""
    global _statm
    for _ in range(2):
        try:
            if _statm is None or _statm[0] != os.getpid():
                _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
            return int(os.pread(_statm[1], 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError, AttributeError):
            # not Linux, or a script closed the descriptor (its number may now be another
            # file's): open it again once
            _statm = None
    import psutil

    return int(psutil.Process().memory_info().rss)


#: (pid, descriptor of /proc/self/statm opened by that process)
_statm: tuple[int, int] | None = None


def open_new(dest: str | os.PathLike[str], *, reuse: bool = True) -> tuple[int, str]:
    """(descriptor open for writing, temporary path) of a file to be written and renamed onto
    ``dest``: a spare of ``dest``'s folder, overwritten from its start (truncate it to what was
    written before the rename), or, with none (or not ``reuse``), a new empty file."""
    dest = Path(dest)
    spares = dest.parent / SPARE_DIR
    try:
        names = os.listdir(spares) if reuse else []
    except FileNotFoundError:
        names = []
    for name in names:
        tmp = dest.parent / f".{dest.name}.{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(spares / name, tmp)  # atomic: of two takers, one gets it
            return os.open(tmp, os.O_WRONLY), str(tmp)
        except FileNotFoundError:
            continue
        except OSError:
            tmp.unlink(missing_ok=True)
            continue
    return tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)


def drop_spares(folder: str | os.PathLike[str]) -> None:
    """Remove ``folder``'s spares and stop it keeping any (a file retired later is removed)."""
    spares = Path(folder) / SPARE_DIR
    for _ in range(10):  # a file retired while this runs is removed on the next pass
        try:
            names = os.listdir(spares)
        except FileNotFoundError:
            return
        for name in names:
            remove_soon(spares / name)
        try:
            spares.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            continue
