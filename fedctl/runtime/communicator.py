"""The Communicator a job process uses: tasks go out through the server process to real sites.

Global models are written once per task as a blob file in the job's folder; the server announces
the task to each target, the site fetches the blob, runs its script, uploads its result blob and
announces it; the server relays the announcement here and the result is read from the file. The
control messages between this process and the server are small JSON frames on a unix socket.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import Task, TaskResult, join_model, split_model
from fedctl.codec.tensors import load_file, save_file
from fedctl.errors import CodecError, RunFailed
from fedctl.transport.frames import FrameSocket
from fedctl.workflows.base import Communicator, ResultStream

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.job")

#: a site's result may be this much bigger than the model it was sent (optimizer state, …)
RESULT_FACTOR = 4


def natural_key(name: str) -> list[Any]:
    """Sort key that puts site-2 before site-10 (the order that gives sites their index)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class RuntimeStream(ResultStream):
    """Results of one task, relayed by the server process."""

    def __init__(self, comm: RuntimeCommunicator, task_id: str, targets: Sequence[str]) -> None:
        self.comm = comm
        self.task_id = task_id
        self.targets = tuple(targets)
        self._pending = set(targets)
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.cancelled = False
        self.max_bytes = 0

    @property
    def pending(self) -> set[str]:
        return set(self._pending)

    def next(self, timeout: float | None) -> TaskResult | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._pending and not self.cancelled:
            try:
                msg = self.inbox.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
                continue
            site = msg["site"]
            if site not in self._pending:
                continue  # a duplicate or a site that was dropped from this task
            self._pending.discard(site)
            return self._result(msg)
        return None

    def _result(self, msg: dict[str, Any]) -> TaskResult:
        site = msg["site"]
        if msg["t"] == "failed":
            return TaskResult(
                site, self.task_id, error=msg.get("error"), traceback=msg.get("traceback")
            )
        try:
            tensors: dict[str, torch.Tensor] = {}
            if msg.get("blob"):
                tensors, _ = load_file(msg["blob"], max_bytes=self.max_bytes)
            model = join_model(msg["header"], tensors)
        except CodecError as exc:
            return TaskResult(site, self.task_id, error=f"invalid result: {exc}")
        finally:
            if msg.get("blob"):
                Path(msg["blob"]).unlink(missing_ok=True)  # the aggregate keeps what it needs
        return TaskResult(site, self.task_id, model=model, duration=float(msg.get("duration", 0)))

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self._pending:
            self.comm.send({"t": "cancel", "task_id": self.task_id, "sites": sorted(self._pending)})
        self._pending.clear()
        self.comm.streams.pop(self.task_id, None)


class RuntimeCommunicator(Communicator):
    """Communicator of a job process (see the module docstring)."""

    def __init__(
        self,
        ipc: FrameSocket,
        job_id: str,
        job_sites: Sequence[str],
        blob_dir: Path,
        abort: threading.Event,
        on_records: Any = None,
    ) -> None:
        self.ipc = ipc
        self.job_id = job_id
        self.job_sites = sorted(job_sites, key=natural_key)
        self.blob_dir = blob_dir
        self.abort = abort
        self.on_records = on_records
        self.streams: dict[str, RuntimeStream] = {}
        self.ready: list[str] = []
        self.refused: dict[str, str] = {}
        self.offline: list[str] = []
        self.restarted: set[str] = set()
        self._old_blobs: list[str] = []
        self._cond = threading.Condition()
        self.closed = False
        self._reader = threading.Thread(target=self._read, name="job-ipc", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def send(self, msg: dict[str, Any]) -> None:
        self.ipc.send(msg)

    def _read(self) -> None:
        try:
            while True:
                got = self.ipc.recv()
                if got is None:
                    break
                self._on_message(got[0])
        except Exception as exc:
            log.error("lost the connection to the server process: %s", exc)
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()
            self.abort.set()

    def _on_message(self, h: dict[str, Any]) -> None:
        kind = h["t"]
        if kind == "sites":
            with self._cond:
                self.ready = [s for s in h.get("ready", []) if s in self.job_sites]
                self.refused = dict(h.get("refused", {}))
                self.offline = list(h.get("offline", []))
                self._cond.notify_all()
        elif kind in ("result", "failed"):
            stream = self.streams.get(str(h.get("task_id")))
            if stream is not None:
                stream.inbox.put(h)
            elif h.get("blob"):
                Path(h["blob"]).unlink(missing_ok=True)  # late: its round already closed
        elif kind == "records" and self.on_records is not None:
            self.on_records(str(h.get("site")), h.get("records") or [])
        elif kind == "site_restarted":
            with self._cond:
                self.restarted.add(str(h.get("site")))
        elif kind == "abort":
            log.warning("abort requested: %s", h.get("reason"))
            self.abort.set()

    # ------------------------------------------------------------------ Communicator

    def sites(self) -> list[str]:
        with self._cond:
            return list(self.ready)

    def wait_for_sites(self, count: int, timeout: float | None) -> list[str]:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        with self._cond:
            while len(self.ready) < count and not self.closed and not self.abort.is_set():
                possible = len(self.job_sites) - len(self.refused)
                if possible < count:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.5))
            if len(self.ready) >= count:
                return list(self.ready)
            if self.abort.is_set() or self.closed:
                return list(self.ready)
            parts = [f"{s}: refused: {r}" for s, r in sorted(self.refused.items())]
            if self.offline:
                parts.append(f"offline: {', '.join(self.offline)}")
            raise RunFailed(
                f"the job needs {count} sites but {len(self.ready)} are ready"
                + (f" ({'; '.join(parts)})" if parts else "")
            )

    def broadcast(self, task: Task, targets: Sequence[str]) -> RuntimeStream:
        header, tensors = split_model(task.model)
        blob = None
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        for old in self._old_blobs:  # earlier tasks' models: their rounds are over
            (self.blob_dir / old).unlink(missing_ok=True)
        self._old_blobs.clear()
        if tensors:
            blob = f"task.{task.task_id.replace(':', '_')}.safetensors"
            save_file(tensors, self.blob_dir / blob)
            self._old_blobs.append(blob)
        stream = RuntimeStream(self, task.task_id, targets)
        stream.max_bytes = max(RESULT_FACTOR * nbytes, 64 * 1024 * 1024)
        self.streams[task.task_id] = stream
        self.send(
            {
                "t": "dispatch",
                "task_id": task.task_id,
                "name": task.name,
                "header": header,
                "blob": blob,
                "targets": list(targets),
            }
        )
        return stream
