"""The server's side of its link to job processes (a private unix socket, JOB messages).

A job process connects back with its one-time token, is told its sites and seed, then sends
tasks (``dispatch``), cancellations, workflow events and its final status; the server relays
to it its sites' results and failures, their tracking records, and every change in which of
its sites are ready. See :mod:`fedctl.codec.protocol` for the messages.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
from typing import TYPE_CHECKING

from fedctl._fs import sha256_file
from fedctl.codec import protocol
from fedctl.codec.frames import FrameError, FrameSocket
from fedctl.codec.protocol import (
    BlobInfo,
    CancelTask,
    Dispatch,
    Finished,
    JobAbort,
    JobCancel,
    JobHello,
    JobRefused,
    JobStart,
    Message,
    SitesChanged,
    SiteTask,
    WorkflowEvent,
)
from fedctl.constants import result_limit
from fedctl.errors import FedctlError
from fedctl.jobs import ABORTED, RUNNING, TERMINAL, natural_key, user_round
from fedctl.transport.local import listen_unix

if TYPE_CHECKING:
    from fedctl.runtime.scheduler import Scheduler
    from fedctl.runtime.serverstate import JobRuntime, ServerState

log = logging.getLogger("fedctl.server")


class JobLink:
    """Accepts job processes and carries their messages (see the module docstring)."""

    def __init__(self, state: ServerState, scheduler: Scheduler) -> None:
        self.state = state
        self.scheduler = scheduler
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Listen on the private socket and accept job processes in a thread."""
        self._sock = listen_unix(self.state.ipc_path, 64)
        threading.Thread(target=self._accept_loop, name="job-link", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self.state.ipc_path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self.state.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(FrameSocket(conn),), daemon=True).start()

    def _serve(self, fs: FrameSocket) -> None:
        rt: JobRuntime | None = None
        try:
            hello = protocol.recv(fs, JobHello)
            if hello is None:
                return
            rt = self.state.job(hello.job)
            if rt is None or not secrets.compare_digest(hello.token, rt.token):
                protocol.send(fs, JobRefused("unknown job or bad token"))
                return
            if rt.finished:
                protocol.send(fs, JobAbort(rt.abort_reason or "job already ended"))
                return
            rt.ipc = fs
            self.state.store.transition(rt.rec.id, RUNNING)
            protocol.send(fs, JobStart(rt.rec.sites, rt.rec.seed, self.state.config.offline_grace))
            self.notify_sites(rt)
            while True:
                msg = protocol.recv(fs, Dispatch, JobCancel, WorkflowEvent, Finished)
                if msg is None:
                    return
                self._on_message(rt, msg)
        except (OSError, FedctlError) as exc:
            if rt is None or not rt.finished:
                log.warning("job connection ended: %s", exc)
        finally:
            if rt is not None:
                fs.close()

    def _on_message(self, rt: JobRuntime, msg: Message) -> None:
        if isinstance(msg, Dispatch):
            self._dispatch(rt, msg)
        elif isinstance(msg, JobCancel):
            for name in msg.sites:
                with self.state.lock:
                    rt.outstanding.get(msg.task_id, set()).discard(name)
                self.state.send_to_site(name, CancelTask(job=rt.rec.id, task_id=msg.task_id))
        elif isinstance(msg, WorkflowEvent):
            event = msg.event
            kind = str(event.get("event", "event"))
            self.state.store.add_event(
                rt.rec.id, kind, {k: v for k, v in event.items() if k != "event"}
            )
            if kind == "result" and event.get("ok") is False:
                # a site's result refused or failed: named, with the reason, in the audit trail
                self.state.audit.record(
                    "result_failed",
                    str(event.get("site")),
                    job=rt.rec.id,
                    round=event.get("round"),
                    reason=str(event.get("error"))[:2000],
                )
            if kind == "filtered":  # the server's own filters on a result (or a broadcast)
                listed = event.get("filters")
                names = listed if isinstance(listed, list) else []
                self.state.audit.record(
                    "filters_applied",
                    str(event.get("site")) if event.get("site") else None,
                    job=rt.rec.id,
                    round=event.get("round"),
                    point=str(event.get("point")),
                    filters=[str(n) for n in names][:100],
                )
            if kind == "round_started":
                self.state.store.update(rt.rec.id, round=event.get("round"))
            elif kind == "round_completed":
                self.state.store.update(rt.rec.id, metrics=event.get("metrics") or {})
        elif isinstance(msg, Finished):
            if msg.status not in TERMINAL:
                raise FrameError(f"bad final status {msg.status!r}")
            status, reason = msg.status, msg.reason
            if rt.abort_reason:
                status, reason = ABORTED, rt.abort_reason
            self.scheduler.finish(rt, status, reason)

    def _dispatch(self, rt: JobRuntime, msg: Dispatch) -> None:
        blob_info = None
        size = 0
        if msg.blob is not None:
            path = rt.blob_path(msg.blob)
            size = path.stat().st_size
            # the job process hashed the file while writing it; hash here otherwise
            sha = msg.blob_info.sha256 if msg.blob_info else sha256_file(path)
            blob_info = rt.task_blobs[path.name] = BlobInfo(path.name, size, sha)
        with self.state.lock:  # a task may be sent again to a site that restarted
            owed = rt.outstanding.setdefault(msg.task_id, set())
            owed.update(set(msg.targets) & set(rt.rec.sites))
            rt.result_limit[msg.task_id] = result_limit(msg.result_limit, size)
        self.state.audit.record(
            "model_sent",
            None,
            job=rt.rec.id,
            task=msg.task_id,
            task_name=msg.name,
            round=user_round(msg.header.get("current_round")),
            sites=msg.targets,
            sha256=blob_info.sha256 if blob_info else None,
            size=blob_info.size if blob_info else None,
        )
        for name in msg.targets:
            conn = self.state.site(name)
            if conn is None or name not in rt.rec.sites:
                self.to_job(rt, _failed(name, msg.task_id, "site is not part of this job"))
                continue
            header = msg.header
            extra = (msg.site_meta or {}).get(name)
            if extra:
                header = {**header, "meta": {**(header.get("meta") or {}), **extra}}
            conn.link.send(
                SiteTask(
                    job=rt.rec.id,
                    task_id=msg.task_id,
                    name=msg.name,
                    header=header,
                    blob=blob_info,
                )
            )

    # ------------------------------------------------------------------ to job processes

    def to_job(self, rt: JobRuntime, msg: Message) -> None:
        """Relay a message to the job's process (dropped, with a line, if it is gone)."""
        if rt.ipc is not None:
            try:
                protocol.send(rt.ipc, msg)
            except OSError:
                log.warning("job %s: its process is gone; dropping %s", rt.rec.id, msg.KIND)

    def notify_sites(self, rt: JobRuntime) -> None:
        """Tell the job which of its sites are ready, refused it, or are offline."""
        if rt.ipc is None:
            return
        online = self.state.online()
        with self.state.lock:
            msg = SitesChanged(
                ready=sorted((s for s in rt.deployed if s in online), key=natural_key),
                refused=dict(rt.refused),
                offline=sorted((s for s in rt.rec.sites if s not in online), key=natural_key),
            )
        with contextlib.suppress(OSError):
            protocol.send(rt.ipc, msg)

    def notify_sites_changed(self) -> None:
        """A site came, went or deployed: every running job hears about its own sites."""
        for rt in self.state.running():
            self.notify_sites(rt)


def _failed(site: str, task_id: str, error: str, tb: str | None = None) -> protocol.JobTaskFailed:
    """The message that tells a job process a site's task failed."""
    return protocol.JobTaskFailed(site=site, task_id=task_id, error=error, traceback=tb)
