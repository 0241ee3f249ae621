"""The Communicator a job process uses: tasks go out through the server process to real sites.

Global models are written once per task as a blob file in the job's folder; the server announces
the task to each target, the site fetches the blob, runs its script, uploads its result blob and
announces it; the server relays the announcement here and the result is read from the file. The
control messages between this process and the server are small JSON frames on a unix socket.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import remove_soon, retire
from fedctl.codec import protocol
from fedctl.codec.frames import FrameSocket
from fedctl.codec.model import Task, TaskResult, join_model, split_model
from fedctl.codec.protocol import (
    Dispatch,
    FileInfo,
    JobAbort,
    JobCancel,
    JobRecords,
    JobResult,
    JobTaskFailed,
    Message,
    SiteRestarted,
    SitesChanged,
)
from fedctl.codec.tensorfiles import lazy_model, load_file, save_file_hashed
from fedctl.constants import result_limit
from fedctl.errors import CodecError, RunFailed
from fedctl.jobs import natural_key
from fedctl.workflows.base import Communicator, ResultStream

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedctl.job")

#: how long a round waits, once it has enough sites, for the others that are still deploying
DEPLOY_GRACE = 30.0
#: results bigger than this are read tensor by tensor as they are aggregated, never whole
LAZY_BYTES = 256 * 1024 * 1024


class ServerLost(RunFailed):
    """The connection to the server process broke (it stopped or was killed)."""


class RuntimeStream(ResultStream):
    """Results of one task, relayed by the server process."""

    def __init__(self, comm: RuntimeCommunicator, dispatch: Dispatch) -> None:
        self.comm = comm
        self.dispatch = dispatch
        self.task_id = dispatch.task_id
        self.targets = tuple(dispatch.targets)
        self._pending = set(self.targets)
        self.inbox: queue.Queue[JobResult | JobTaskFailed] = queue.Queue()
        self.cancelled = False
        self.max_bytes = 0
        #: when the task was (last) sent to each site
        self.sent_at = dict.fromkeys(self.targets, time.monotonic())

    @property
    def pending(self) -> set[str]:
        return set(self._pending)

    def next(self, timeout: float | None) -> TaskResult | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self._pending and not self.cancelled:
            for site in sorted(self._pending):
                why = self._check(site)
                if why is not None:
                    self._pending.discard(site)
                    return TaskResult(site, self.task_id, error=why)
            try:
                msg = self.inbox.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
                continue
            if msg.site not in self._pending:
                continue  # a duplicate or a site that was dropped from this task
            self._pending.discard(msg.site)
            return self._result(msg)
        return None

    def _check(self, site: str) -> str | None:
        """Why ``site``'s answer can no longer come (None if it can); a site that restarted
        and is deployed again is sent the task once more."""
        why, resend = self.comm.site_state(site, self.sent_at[site])
        if resend:
            log.info("sending task %s again to %s (it restarted)", self.task_id, site)
            self.sent_at[site] = time.monotonic()
            self.comm.post(dataclasses.replace(self.dispatch, targets=[site]))
        return why

    def _result(self, msg: JobResult | JobTaskFailed) -> TaskResult:
        site = msg.site
        if isinstance(msg, JobTaskFailed):
            return TaskResult(site, self.task_id, error=msg.error, traceback=msg.traceback)
        blob = msg.blob
        try:
            if blob and Path(blob).stat().st_size > LAZY_BYTES:
                model = lazy_model(msg.header, Path(blob), self.max_bytes, delete=True)
            else:
                tensors: dict[str, torch.Tensor] = {}
                if blob:
                    release = functools.partial(retire, blob)
                    tensors, _ = load_file(blob, max_bytes=self.max_bytes, on_release=release)
                model = join_model(msg.header, tensors)
            blob = None  # retired (a spare for the server) once nothing maps it
        except (CodecError, OSError) as exc:
            return TaskResult(site, self.task_id, error=f"invalid result: {exc}")
        finally:
            if blob:
                remove_soon(blob)
        return TaskResult(site, self.task_id, model=model)

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self._pending:
            self.comm.post(JobCancel(self.task_id, sorted(self._pending)))
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
        on_records: Callable[[str, list[dict[str, Any]]], None] | None = None,
        *,
        offline_grace: float = 60.0,
        on_late: Callable[[str], None] | None = None,
    ) -> None:
        self.ipc = ipc
        self.job_id = job_id
        self.job_sites = sorted(job_sites, key=natural_key)
        self.blob_dir = blob_dir
        self.abort = abort
        self.on_records = on_records
        #: called with one line when a result arrives after its round closed
        self.on_late = on_late
        self.streams: dict[str, RuntimeStream] = {}
        self.ready: list[str] = []
        #: since when each ready site has been ready (it restarted before that, or never)
        self.ready_since: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        self.offline: list[str] = []
        #: when a site that restarted (and so lost its tasks) did so, by site
        self.restarted: dict[str, float] = {}
        #: since when a site of this job has been offline
        self.offline_since: dict[str, float] = {}
        #: seconds a site may be offline before its outstanding tasks count as failed
        self.offline_grace = offline_grace
        #: each task's model file, by task id, kept while a site may still fetch it
        self._blobs: dict[str, str] = {}
        self._cond = threading.Condition()
        self.closed = False
        #: the server process went away (as opposed to asking this job to stop)
        self.server_lost = False
        self._reader = threading.Thread(target=self._read, name="job-ipc", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def post(self, msg: Message) -> None:
        """A message to the server process; ServerLost if it is gone."""
        try:
            protocol.send(self.ipc, msg)
        except OSError as exc:
            self.server_lost = True
            self.abort.set()
            raise ServerLost(f"lost the connection to the server process: {exc}") from None

    def _read(self) -> None:
        try:
            while True:
                msg = protocol.recv(
                    self.ipc,
                    SitesChanged,
                    JobResult,
                    JobTaskFailed,
                    JobRecords,
                    SiteRestarted,
                    JobAbort,
                )
                if msg is None:
                    break
                self._on_message(msg)
        except Exception as exc:
            log.error("lost the connection to the server process: %s", exc)
        finally:
            with self._cond:
                if not self.abort.is_set():
                    self.server_lost = True
                self.closed = True
                self._cond.notify_all()
            self.abort.set()

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, SitesChanged):
            now = time.monotonic()
            with self._cond:
                ready = [s for s in msg.ready if s in self.job_sites]
                for site in ready:
                    if site not in self.ready:
                        self.ready_since[site] = now
                self.ready = ready
                self.refused = dict(msg.refused)
                self.offline = list(msg.offline)
                for site in self.offline:
                    self.offline_since.setdefault(site, now)
                for site in [s for s in self.offline_since if s not in self.offline]:
                    del self.offline_since[site]
                self._cond.notify_all()
        elif isinstance(msg, JobResult | JobTaskFailed):
            stream = self.streams.get(msg.task_id)
            if stream is not None:
                stream.inbox.put(msg)
            else:  # late: its round already closed; dropped, but said
                if isinstance(msg, JobResult) and msg.blob:
                    remove_soon(msg.blob)
                if self.on_late is not None:
                    self.on_late(
                        f"late result from {msg.site} for task {msg.task_id} "
                        "dropped (its round had closed)"
                    )
        elif isinstance(msg, JobRecords):
            if self.on_records is not None:
                self.on_records(msg.site, msg.records)
        elif isinstance(msg, SiteRestarted):
            with self._cond:
                self.restarted[msg.site] = time.monotonic()
                self._cond.notify_all()
        elif isinstance(msg, JobAbort):
            log.warning("abort requested: %s", msg.reason)
            self.abort.set()

    def site_state(self, site: str, since: float) -> tuple[str | None, bool]:
        """For a task sent to ``site`` at ``since``: (why it can no longer come back, or None;
        whether to send it again because the site restarted and is deployed again)."""
        with self._cond:
            if site in self.refused:
                return f"refused the job: {self.refused[site]}", False
            off = self.offline_since.get(site)
            if off is not None and time.monotonic() - off > self.offline_grace:
                return f"offline for more than {self.offline_grace:.0f}s", False
            restarted = self.restarted.get(site, -1.0)
            if restarted >= since:  # it lost the task; send it again once it is back
                back = site in self.ready and self.ready_since.get(site, -1.0) > restarted
                return None, back
        return None, False

    def _deploying(self) -> list[str]:
        """Sites of the job that are online, not refused and not ready yet (caller holds lock)."""
        return [
            s
            for s in self.job_sites
            if s not in self.ready and s not in self.refused and s not in self.offline
        ]

    # ------------------------------------------------------------------ Communicator

    def sites(self) -> list[str]:
        with self._cond:
            return list(self.ready)

    def wait_for_sites(self, count: int, timeout: float | None) -> list[str]:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        with self._cond:
            while len(self.ready) < count and not self.closed and not self.abort.is_set():
                now = time.monotonic()
                gone = set(self.refused) | {
                    s for s, t in self.offline_since.items() if now - t > self.offline_grace
                }
                if len(self.job_sites) - len(gone) < count:
                    break  # cannot be reached any more: say so now rather than at the deadline
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.5))
            if len(self.ready) >= count:
                # Enough to start, but sites that are online and still deploying (or
                # redeploying after a restart) get a moment to join rather than miss the round.
                grace_end = time.monotonic() + min(
                    DEPLOY_GRACE, max(0.0, deadline - time.monotonic())
                )
                while (
                    self._deploying() and time.monotonic() < grace_end and not self.abort.is_set()
                ):
                    self._cond.wait(min(grace_end - time.monotonic(), 0.5))
                return list(self.ready)
            if self.abort.is_set() or self.closed:
                return list(self.ready)
            parts = [f"{s} refused: {r}" for s, r in sorted(self.refused.items())]
            if self.offline:
                parts.append(f"offline: {', '.join(self.offline)}")
            if self._deploying():
                parts.append(f"still deploying: {', '.join(self._deploying())}")
            raise RunFailed(
                f"the job needs {count} sites but {len(self.ready)} are ready"
                + (f" ({'; '.join(parts)})" if parts else "")
            )

    def broadcast(self, task: Task, targets: Sequence[str]) -> RuntimeStream:
        header, tensors = split_model(task.model)
        blob = None
        blob_info = None
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        for task_id, old in list(self._blobs.items()):
            # a finished task's model: no site fetches it any more (an asynchronous workflow
            # has several tasks in flight, whose sites may still fetch or fetch again)
            stream = self.streams.get(task_id)
            if stream is None or stream.done or stream.cancelled:
                retire(self.blob_dir / old)  # the server only reads it: a spare
                del self._blobs[task_id]
        if tensors:
            blob = f"task.{task.task_id.replace(':', '_')}.safetensors"
            size, sha = save_file_hashed(tensors, self.blob_dir / blob, durable=False)
            blob_info = FileInfo(size, sha)
            self._blobs[task.task_id] = blob
        dispatch = Dispatch(
            task_id=task.task_id,
            name=task.name,
            header=header,
            targets=list(targets),
            blob=blob,
            blob_info=blob_info,
            site_meta=dict(task.site_meta) or None,
            result_limit=task.result_bytes,
        )
        stream = RuntimeStream(self, dispatch)
        stream.max_bytes = result_limit(task.result_bytes, nbytes)
        self.streams[task.task_id] = stream
        self.post(dispatch)
        return stream
