"""The simulator's process backend: worker processes forked by a zygote, models in shared memory.

``backend="process"`` (what ``"auto"`` picks on one machine) starts no Ray: a zygote
(:mod:`fedctl.sim.zygote`) imports torch once and forks the workers, each joined to the driver by
a socket pair. Models move as files in a private folder of ``/dev/shm`` (or of the run folder
when ``/dev/shm`` is small): the driver writes the round's global model once and every worker
maps it (privately: copy-on-write, a write never reaches the file); a result above
:data:`FILE_INLINE_BYTES` is written once by its worker and mapped by the driver, smaller ones
travel in their batch's reply. So, as with Ray's object store, one copy of
each model exists in memory and reads are zero-copy. A per-round script's large tensors then
share their pages with the result file they were written to (:mod:`fedctl.sim.remap`), so what
it sent is not held twice while it ends.
"""

from __future__ import annotations

import gc
import itertools
import os

# pickle is safe here: it carries only the simulator's own messages (work items, results) over
# socket pairs this process creates and hands to workers forked by its own zygote, so no other
# process can write to them and nothing from the network reaches pickle.loads. A result holds
# what the user's own script sent in the user's own simulation, code that already runs with the
# same rights in the worker. Submitted jobs run only in the POC and production runtime, which
# cannot import this module (docs/architecture.md; tests/test_architecture.py pins both).
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import private_dir
from fedctl.constants import SCRIPT_ENV_DEFAULTS
from fedctl.errors import RunFailed
from fedctl.sim import remap
from fedctl.sim.pool import Pool, WorkerDied
from fedctl.sim.transport import Packed, _clone, pack, unpack

if TYPE_CHECKING:
    import torch

    from fedctl.codec.model import TaskResult
    from fedctl.sim.worker import WorkerConfig, WorkItem

#: Results up to this size travel in their batch's reply; larger ones as a file. Lower than Ray's
#: :data:`~fedctl.sim.transport.INLINE_BYTES`: a reply is pickled, sent, received and unpickled
#: (four copies), a file is written once and mapped (1,000 sites of a 400 kB model: 25% faster).
FILE_INLINE_BYTES = 64 * 1024
#: a worker's next batch is sent while it runs one only up to this size, far below a socket's
#: buffer: both ends may then block in a send only if the other is reading (no deadlock)
QUEUE_BYTES = 64 * 1024
#: /dev/shm is used when it has at least this much room; else the run folder (page cache)
SHM_MIN_FREE = 1 << 30
Meta = list[tuple[str, str, tuple[int, ...]]]


def transport_dir(run_dir: Path) -> Path:
    """A private folder for this run's model files: in /dev/shm when it has room."""
    root = Path("/dev/shm")
    try:
        st = os.statvfs(root)
        roomy = st.f_bavail * st.f_frsize >= SHM_MIN_FREE and os.access(root, os.W_OK)
    except OSError:
        roomy = False
    return private_dir(root if roomy else run_dir)


class SharedFile:
    """The driver's handle on a global model written for the workers; the file is removed when
    the handle is dropped (workers that mapped it keep their mapping)."""

    def __init__(self, path: Path, meta: Meta) -> None:
        self.wire = ("file", str(path), meta)
        self._done = weakref.finalize(self, _unlink, str(path))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class FileTransport:
    """Model files in one folder: write once, map copy-on-write everywhere (see module doc)."""

    #: the driver may keep the mapped copy as the global model (one copy, not two)
    shares_memory = True

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._names = itertools.count()
        #: a result's pages were mapped over a script's tensors since the last release()
        self._remapped = False

    def _write(
        self,
        packed: Packed,
        offsets: list[int] | None = None,
        in_place: Sequence[tuple[int, int] | None] = (),
    ) -> Path:
        """Write ``packed`` to a new file, each tensor at its ``offsets`` entry (else where
        :func:`_layout` places it). Where ``in_place`` gives a tensor's (start, length) of whole
        pages, those pages are mapped from the file as soon as each piece of them is written
        (fedctl.sim.remap): the tensor's bytes never exist twice for longer than a piece."""
        meta, arrays = packed
        if offsets is None:
            offsets = [o for o, _ in _layout(meta)[0]]
        path = self.dir / f"{os.getpid()}-{next(self._names)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for i, (arr, offset) in enumerate(zip(arrays, offsets, strict=True)):
                if arr is None:
                    continue
                view = memoryview(arr).cast("B")
                span = in_place[i] if i < len(in_place) else None
                if span is None:
                    _pwrite(fd, view, offset)
                    continue
                start, length = span
                _pwrite(fd, view[:start], offset)
                for a in range(start, start + length, remap.PIECE):
                    b = min(a + remap.PIECE, start + length)
                    _pwrite(fd, view[a:b], offset + a)
                    remap.remap(fd, arr.ctypes.data + a, b - a, offset + a)
                _pwrite(fd, view[start + length :], offset + start + length)
        finally:
            os.close(fd)
        return path

    def share(self, params: dict[str, torch.Tensor]) -> SharedFile:
        """Write the round's global params once for every worker."""
        packed = pack(params)
        return SharedFile(self._write(packed), packed[0])

    def snapshot(self, params: dict[str, torch.Tensor], *, in_place: bool = False) -> Any:
        """Freeze what a script sent, at send time: small results are cloned into the batch's
        reply, large ones written to a file now. With ``in_place``, the pages of the sent
        tensors are then mapped from that file (fedctl.sim.remap): one copy in memory, not two.
        Only for a script that ends after this result (per-round), whose worker calls
        :meth:`release` once it has."""
        nbytes = sum(t.numel() * t.element_size() for t in params.values())
        if nbytes <= FILE_INLINE_BYTES:
            return ("inline", pack(_clone(params)))
        packed = pack(params)
        meta, arrays = packed
        spans = [(a.ctypes.data, a.nbytes) if a is not None else (0, 0) for a in arrays]
        planned = remap.plan(spans) if in_place else []
        if not planned:
            return ("result", str(self._write(packed)), meta)
        pages = {lo - delta: (delta, length) for lo, length, delta in planned}
        anchors = {i: addr for i, (addr, n) in enumerate(spans) if n and addr in pages}
        offsets = [o for o, _ in _layout(meta, anchors)[0]]
        # each such tensor's whole pages: (where they start in it, their length)
        whole = [pages[addr] if i in anchors else None for i, (addr, _) in enumerate(spans)]
        self._remapped = True
        path = self._write(packed, offsets, whole)
        return ("result", str(path), meta, offsets)

    def release(self) -> int:
        """Give anything a finished script kept of its results its own memory again (see
        fedctl.sim.remap.unpin); returns the bytes moved."""
        if not self._remapped:
            return 0  # nothing to look for (reading /proc/self/maps costs ~0.5 ms)
        self._remapped = False
        prefix = f"{self.dir}/{os.getpid()}-"
        if not remap.mapped(prefix):
            return 0
        gc.collect()  # what a script held may only be in a reference cycle
        return remap.unpin(prefix)

    def get(self, handle: Any) -> dict[str, torch.Tensor]:
        """The params behind ``handle`` (views of a private mapping for files)."""
        if isinstance(handle, SharedFile):
            handle = handle.wire
        kind = handle[0]
        if kind == "inline":
            return unpack(handle[1])
        path, meta = handle[1], handle[2]
        try:
            return _map(path, meta, handle[3] if len(handle) > 3 else None)
        finally:
            if kind == "result":
                _unlink(path)  # read once, by the driver (or refused); a mapping stays valid

    def private_copy(self, handle: Any) -> dict[str, torch.Tensor] | None:
        """A script's own copy of the global params behind ``handle``: a copy-on-write mapping
        of its file, so the pages stay shared until the script writes to them (None: not a
        file handle; the caller clones)."""
        if not (isinstance(handle, tuple) and handle[0] == "file"):
            return None
        _, path, meta = handle
        return _map(path, meta)


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    """All of ``view`` at ``offset`` (pwrite may write less than asked)."""
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _map(path: str, meta: Meta, offsets: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors, in ``meta``'s order (at ``offsets``, else where :func:`_layout`
    places them), as views of one private (copy-on-write) mapping: pages stay shared with every
    other mapping of the file until this process writes them, and a write never reaches the
    file. torch keeps no file descriptor open for the mapping."""
    import torch

    from fedctl.codec.tensors import torch_dtype

    spans, total = _layout(meta)
    if offsets is not None:
        spans = _placed(meta, spans, offsets)
        total = max((o + n for o, n in spans if n), default=0)
    whole = torch.from_file(path, shared=False, size=total, dtype=torch.uint8) if total else None
    out: dict[str, torch.Tensor] = {}
    for (name, dname, shape), (offset, n) in zip(meta, spans, strict=True):
        dtype = torch_dtype(dname)
        if n and whole is not None:
            out[name] = whole[offset : offset + n].view(dtype).reshape(shape)
        else:
            out[name] = torch.empty(shape, dtype=dtype)
    return out


def _placed(
    meta: Meta, spans: list[tuple[int, int]], offsets: Sequence[int]
) -> list[tuple[int, int]]:
    """``spans`` moved to ``offsets`` (a worker's result file), if each is a usable place."""
    from fedctl.codec.tensors import torch_dtype

    if len(offsets) != len(spans):
        raise ValueError("a result file's offsets do not match its tensors")
    out = []
    for m, (_, n), o in zip(meta, spans, offsets, strict=True):
        if isinstance(o, bool) or not isinstance(o, int) or o < 0 or o % torch_dtype(m[1]).itemsize:
            raise ValueError(f"a result file's tensor offset {o!r} is not usable")
        out.append((o, n))
    return out


#: every tensor starts at a multiple of this in a model file (torch views need aligned offsets)
ALIGN = 64


def _layout(
    meta: Meta, anchors: Mapping[int, int] | None = None
) -> tuple[list[tuple[int, int]], int]:
    """Each tensor's (offset, bytes) in a model file, and the file's size. A tensor with an
    address in ``anchors`` (by its index) starts on the same place within a page as that
    address (so its pages can be mapped over it: fedctl.sim.remap); the others at the next
    multiple of :data:`ALIGN`."""
    from fedctl.codec.tensors import torch_dtype

    spans, end = [], 0
    for i, (_, dname, shape) in enumerate(meta):
        n = torch_dtype(dname).itemsize
        for d in shape:
            n *= d
        addr = anchors.get(i) if anchors else None
        offset = -(-end // ALIGN) * ALIGN if addr is None else end + (addr - end) % remap.PAGE
        spans.append((offset, n))
        end = offset + n
    return spans, max((o + n for o, n in spans if n), default=0)


class Zygote:
    """The process that forks the workers (``python -m fedctl.sim.zygote``); start it early,
    it imports torch while the driver prepares the run. It owns the run's transport folder
    ``dir`` (removed when the zygote ends, also when the driver was killed)."""

    def __init__(self, log_path: Path, directory: Path) -> None:
        self.dir = directory
        ours, theirs = socket.socketpair()
        import fedctl

        env = {**SCRIPT_ENV_DEFAULTS, **os.environ}  # the workers run client scripts
        here = str(Path(fedctl.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedctl.sim.zygote", str(theirs.fileno()), str(directory)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the driver, which stops the workers
            )
        theirs.close()
        self.control = ours
        self.log_path = log_path

    def fork(self) -> tuple[int, Connection]:
        """A new worker: its PID and the driver's end of its connection."""
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(self.control, [b"f"], [theirs.fileno()])
            reply = b""
            while len(reply) < 8:
                chunk = self.control.recv(8 - len(reply))
                if not chunk:
                    raise RunFailed(f"the simulator's worker zygote ended ({self._last_line()})")
                reply += chunk
        except OSError as exc:
            raise RunFailed(f"the simulator's worker zygote is gone: {exc}") from None
        finally:
            theirs.close()
        return struct.unpack("!q", reply)[0], Connection(ours.detach())

    def _last_line(self) -> str:
        try:
            lines = [x for x in self.log_path.read_text().splitlines() if x.strip()]
        except OSError:
            lines = []
        return lines[-1][:300] if lines else f"exit code {self.proc.poll()}"

    def close(self) -> None:
        """End the zygote (workers are stopped by the pool, by PID)."""
        try:
            self.control.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class _Worker:
    pid: int
    conn: Connection
    #: batches sent (or held) and not answered yet
    outstanding: int = 0
    #: a batch too large to queue on the socket while the worker may be sending its reply
    held: bytes | None = None


@dataclass
class _Token:
    worker: _Worker
    #: a send that failed: the worker is gone
    broken: bool = False


class ProcessPool(Pool):
    """W worker processes forked by a :class:`Zygote` (see the module doc)."""

    def __init__(self, config: WorkerConfig, size: int, zygote: Zygote, timeout: float) -> None:
        self.size = size
        self.config = config
        self.zygote = zygote
        self.dir = directory = zygote.dir
        self.timeout = timeout
        self.transport = FileTransport(directory)
        self.workers: list[_Worker | None] = [None] * size
        try:
            for w in range(size):
                self.workers[w] = self._spawn()
            self._ready(range(size))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The workers' process IDs."""
        return [w.pid for w in self.workers if w is not None]

    def _spawn(self) -> _Worker:
        pid, conn = self.zygote.fork()
        worker = _Worker(pid, conn)
        conn.send_bytes(pickle.dumps((self.config, str(self.dir))))
        return worker

    def _ready(self, which: Sequence[int]) -> None:
        deadline = time.monotonic() + self.timeout
        for w in which:
            worker = self.workers[w]
            assert worker is not None
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                raise RunFailed(f"simulator workers did not start within {self.timeout:.0f}s")
            try:
                reply = pickle.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):
                reply = ("error", f"it ended ({self.zygote._last_line()})")
            if reply[0] != "ready":
                raise RunFailed(f"a simulator worker failed to start: {reply[1]}")

    def submit(self, w: int, items: list[WorkItem], model_id: str, box: list[Any]) -> _Token:
        worker = self.workers[w]
        assert worker is not None
        wire = [h.wire if isinstance(h, SharedFile) else h for h in box]
        token = _Token(worker)
        data = pickle.dumps(("batch", items, model_id, wire), protocol=pickle.HIGHEST_PROTOCOL)
        worker.outstanding += 1
        if worker.outstanding > 1 and len(data) > QUEUE_BYTES:
            # the worker may be blocked sending a large reply: a large send now could block
            # both ends; it goes as soon as that reply is read
            assert worker.held is None
            worker.held = data
            return token
        self._send(worker, data, token)
        return token

    def _send(self, worker: _Worker, data: bytes, token: _Token | None) -> None:
        try:
            worker.conn.send_bytes(data)
        except OSError:
            if token is not None:
                token.broken = True

    def wait(self, tokens: list[Any], timeout: float) -> list[Any]:
        broken = [t for t in tokens if t.broken]
        if broken:
            return broken
        by_conn = {id(t.worker.conn): t for t in tokens}
        ready = wait([t.worker.conn for t in tokens], timeout)
        return [by_conn[id(c)] for c in ready]

    def result(self, token: Any) -> list[tuple[TaskResult, Any]]:
        if token.broken:
            raise WorkerDied(f"process {token.worker.pid} ended")
        worker = token.worker
        try:
            raw = worker.conn.recv_bytes()
        except (EOFError, OSError):
            raise WorkerDied(f"process {worker.pid} ended") from None
        worker.outstanding -= 1
        if worker.held is not None:  # its next batch, held back until this reply was read
            held, worker.held = worker.held, None
            self._send(worker, held, None)  # a failure shows when that batch's reply is read
        reply = pickle.loads(raw)
        if reply[0] == "error":
            raise RuntimeError(f"simulator worker {token.worker.pid}: {reply[1]}")
        return reply[1]

    def restart(self, w: int) -> None:
        old = self.workers[w]
        if old is not None:
            _kill(old)
        self.workers[w] = self._spawn()
        self._ready([w])

    def close(self) -> None:
        """Ask every worker to stop its scripts, then end each by PID, the zygote, the files."""
        live = [w for w in self.workers if w is not None]
        for worker in live:
            try:
                worker.conn.send_bytes(pickle.dumps(("close",)))
            except OSError:
                pass
        deadline = time.monotonic() + 30
        for worker in live:
            if not _ended(worker, deadline):
                _kill(worker)
            worker.conn.close()
        self.workers = [None] * self.size
        self.zygote.close()


def _ended(worker: _Worker, deadline: float) -> bool:
    """Whether the worker answered "closed" and then ended (its end of the socket closed)."""
    try:
        while worker.conn.poll(max(0.0, deadline - time.monotonic())):
            worker.conn.recv_bytes()
    except (EOFError, OSError):
        return True
    return False


def _kill(worker: _Worker) -> None:
    try:
        worker.conn.close()
    except OSError:
        pass
    try:
        os.kill(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
