"""A result's snapshot without a second copy in memory (Linux; the process backend, per-round
scripts).

A script's result is copied into a file in shared memory at ``send`` (the snapshot). Until the
script ends, its own tensors hold the same values: with a large model, two copies. Once a
tensor's bytes are in the file, :func:`remap` replaces the pages under that tensor by a private
(copy-on-write) mapping of the file at the same addresses. The script sees the same values at the
same addresses; its tensor and the snapshot now share their pages, and a write by the script
after ``send`` copies the page it writes, never reaching the file. The snapshot stays what was
sent, and the memory of one copy is given back at once.

Only pages wholly inside a tensor of at least :data:`MIN_BYTES` and inside a private anonymous
mapping (the allocator's own memory, never a file the user mapped, the heap or a stack) are
replaced. :func:`unpin` gives anything a script kept past its end (a model cached in a helper
module) its own memory again, so a result file never outlives the script that sent it.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from collections.abc import Iterable

PAGE = mmap.PAGESIZE
#: smaller tensors are only copied (a remap costs two mappings of the process's budget)
MIN_BYTES = 1 << 20
#: pages are written and remapped this many bytes at a time (the most held twice at once)
PIECE = 8 << 20
#: remaps are made only while the process has at least this many more mappings available
MAP_HEADROOM = 4096

_PROT = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)


class _Libc:
    """libc's mmap, loaded on first use (None where it cannot be)."""

    fn: object = None
    tried = False

    @classmethod
    def mmap(cls) -> object:
        if not cls.tried:
            cls.tried = True
            try:
                f = ctypes.CDLL(None, use_errno=True).mmap
                f.restype = ctypes.c_void_p
                f.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_long,
                ]
                cls.fn = f
            except (OSError, AttributeError):
                cls.fn = None
        return cls.fn


def _maps() -> list[tuple[int, int, str, str, str]] | None:
    """This process's mappings: (start, end, perms, inode, path); None if unknown."""
    try:
        with open("/proc/self/maps") as f:
            rows = f.read().splitlines()
    except OSError:
        return None
    out = []
    for row in rows:
        parts = row.split(maxsplit=5)
        lo, hi = parts[0].split("-")
        out.append(
            (int(lo, 16), int(hi, 16), parts[1], parts[4], parts[5] if len(parts) > 5 else "")
        )
    return out


def _anonymous(maps: list[tuple[int, int, str, str, str]]) -> list[tuple[int, int]]:
    """Private, writable, unnamed mappings (the allocator's), adjacent ones merged."""
    spans: list[tuple[int, int]] = []
    for lo, hi, perms, inode, path in maps:
        if perms != "rw-p" or inode != "0" or path:
            continue
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


def _headroom(count: int) -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read()) - count
    except (OSError, ValueError):
        return 0


def plan(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """For tensors at (address, bytes): the (page address, length, offset into the tensor) of
    the whole pages that may be remapped; empty when this process cannot remap."""
    wanted = [(a, n) for a, n in spans if n >= MIN_BYTES]
    if not wanted or _Libc.mmap() is None:
        return []
    maps = _maps()
    if maps is None or _headroom(len(maps)) < MAP_HEADROOM + 2 * len(wanted):
        return []
    anon = _anonymous(maps)
    starts = [s for s, _ in anon]
    out = []
    for addr, n in wanted:
        lo = -(-addr // PAGE) * PAGE
        hi = (addr + n) // PAGE * PAGE
        if hi - lo < MIN_BYTES:
            continue
        i = bisect.bisect_right(starts, lo) - 1
        if i >= 0 and anon[i][0] <= lo and hi <= anon[i][1]:
            out.append((lo, hi - lo, lo - addr))
    return out


def remap(fd: int, addr: int, length: int, offset: int) -> None:
    """Map file ``fd`` from ``offset`` privately over ``length`` bytes at ``addr`` (whole
    pages)."""
    _fixed(addr, length, mmap.MAP_PRIVATE, fd, offset, "remapping a sent tensor")


def _fixed(addr: int, length: int, flags: int, fd: int, offset: int, what: str) -> None:
    """mmap with MAP_FIXED. A failure may leave a hole where the tensor was: the worker ends
    (its pool replaces it and the site's task fails), so nothing runs on with it."""
    fn = _Libc.mmap()
    assert fn is not None
    got = fn(addr, length, _PROT, flags | _MAP_FIXED, fd, offset)  # type: ignore[operator]
    if got != addr:
        err = os.strerror(ctypes.get_errno())
        os.write(2, f"fedctl: {what} failed ({err}); this worker ends\n".encode())
        os._exit(70)


def mapped(prefix: str) -> bool:
    """Whether this process maps a file whose path starts with ``prefix``."""
    return any(path.startswith(prefix) for *_, path in _maps() or [])


def unpin(prefix: str) -> int:
    """Give every page still mapped from a file whose path starts with ``prefix`` (this
    worker's result files) its own memory again (same values, same addresses), a piece at a
    time, so the file is freed; returns the bytes so moved."""
    maps = _maps()
    if not maps or _Libc.mmap() is None:
        return 0
    moved = 0
    for lo, hi, perms, _, path in maps:
        if not path.startswith(prefix) or perms != "rw-p":
            continue
        for a in range(lo, hi, PIECE):
            n = min(PIECE, hi - a)
            data = ctypes.string_at(a, n)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            _fixed(a, n, flags, -1, 0, "giving a kept tensor its own memory")
            ctypes.memmove(a, data, n)
        moved += hi - lo
    return moved
