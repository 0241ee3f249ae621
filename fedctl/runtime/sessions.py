"""Sites on the server: their ``Session`` streams and their blob downloads and uploads.

A site keeps a ``Session`` stream open. Control messages carry sequence numbers and are
acknowledged; unacknowledged ones are resent when the site reconnects, and duplicates are
dropped, so a reconnect neither loses nor repeats a task or a result. A site that restarts (new
incarnation) is sent its running jobs again. Blobs (job bundles, task models, site results) are
files in the job's folder, moved in chunks by ``Fetch``/``Push``: memory per transfer is one
chunk whatever the model size, and a site may only upload a result it owes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import safe_name
from fedctl.codec import protocol
from fedctl.codec.frames import FrameError
from fedctl.codec.protocol import (
    Ack,
    Deployed,
    Fetch,
    Heartbeat,
    JobRecords,
    JobResult,
    Push,
    Refused,
    SiteHello,
    SiteLog,
    SiteRecords,
    SiteRestarted,
    SiteResult,
    Stored,
    TaskFailed,
    Welcome,
)
from fedctl.errors import PermissionDenied
from fedctl.jobs import user_round
from fedctl.runtime.joblink import _failed
from fedctl.runtime.rpcstatus import LimitExceeded, abort, as_status, who
from fedctl.runtime.serverstate import SiteConn
from fedctl.transport import rpc

if TYPE_CHECKING:
    from fedctl.provision.identity import Identity
    from fedctl.runtime.joblink import JobLink
    from fedctl.runtime.scheduler import Scheduler
    from fedctl.runtime.serverstate import JobRuntime, ServerState

log = logging.getLogger("fedctl.server")

SITE_MESSAGES = (Heartbeat, Ack, Deployed, Refused, SiteResult, TaskFailed, SiteLog, SiteRecords)


class SiteSessions:
    """The ``Session``, ``Fetch`` and ``Push`` handlers (see the module docstring)."""

    def __init__(self, state: ServerState, scheduler: Scheduler, link: JobLink) -> None:
        self.state = state
        self.scheduler = scheduler
        self.link = link

    # ------------------------------------------------------------------ Session

    def Session(self, request_iterator: Any, context: Any) -> Iterator[bytes]:
        state = self.state
        ident = who(context, "site", state.audit)
        with as_status(context, "bad session start: "):
            hello, _ = protocol.decode(next(request_iterator), SiteHello)
        outq: queue.Queue[bytes | None] = queue.Queue()
        with state.lock:
            conn = state.sites.get(ident.name)
            if conn is None:
                conn = state.sites[ident.name] = SiteConn(ident.name, ident.org)
            restarted = conn.incarnation != hello.incarnation
            if restarted:  # a new agent process: new numbering, it has none of our messages
                conn.incarnation = hello.incarnation
                conn.link.reset(incoming=True, outgoing=True)
            conn.link.attach(outq)  # closes an older stream of this site
            conn.connected_at = conn.last_seen = time.time()
            conn.address = context.peer()
            conn.link.acked(hello.recv_seq)
            welcome = Welcome(state.server_id, conn.link.recv_seq, state.config.heartbeat)
            outq.put(protocol.encode(welcome))
            conn.link.resend()
            if restarted:
                self._redeploy(conn)
        log.info("site %s connected from %s", ident.name, context.peer())
        state.audit.record("site_connected", ident.name, peer=context.peer(), restarted=restarted)
        self.link.notify_sites_changed()
        state.wake.set()
        error: list[str] = []
        reader = threading.Thread(
            target=self._read,
            args=(conn, outq, request_iterator, error),
            name=f"site-{ident.name}",
            daemon=True,
        )
        reader.start()
        heartbeat = protocol.encode(Heartbeat())
        try:
            while not state.stopping.is_set():
                try:
                    item = outq.get(timeout=state.config.heartbeat)
                except queue.Empty:
                    item = heartbeat
                if item is None:
                    break
                yield item
        finally:
            conn.link.detach(outq)
            self.link.notify_sites_changed()
            state.audit.record("site_disconnected", ident.name)
            log.info("site %s disconnected", ident.name)
        if error:
            abort(context, "INVALID_ARGUMENT", error[0])

    def _read(self, conn: SiteConn, outq: Any, requests: Any, error: list[str]) -> None:
        try:
            for raw in requests:
                msg, _ = protocol.decode(raw, *SITE_MESSAGES)
                conn.last_seen = time.time()
                self._on_message(conn, msg)
        except FrameError as exc:
            error.append(f"malformed frame from {conn.name}: {exc}")
            log.warning("%s", error[0])
        except Exception as exc:  # the stream ended (cancelled, disconnected)
            log.debug("site %s stream ended: %s", conn.name, exc)
        finally:
            outq.put(None)

    def _on_message(self, conn: SiteConn, msg: Any) -> None:
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, Ack):
            conn.link.acked(msg.seq)
            return
        if not conn.link.accept(msg.seq):
            return  # a resent duplicate: acknowledged again, not processed twice
        rt = self.state.job(msg.job)
        if rt is None or conn.name not in rt.rec.sites:
            log.info(
                "ignoring %s from %s for job %s (not running here)", msg.KIND, conn.name, msg.job
            )
            return
        state = self.state
        if isinstance(msg, Deployed):
            state.audit.record("job_deployed", conn.name, job=msg.job)
            with state.lock:
                rt.deployed.add(conn.name)
            state.event(rt, "site_deployed", {"site": conn.name})
            self.link.notify_sites_changed()
        elif isinstance(msg, Refused):
            reason = msg.reason[:2000]
            state.audit.record("job_refused", conn.name, job=msg.job, reason=reason)
            with state.lock:
                rt.refused[conn.name] = reason
                rt.deployed.discard(conn.name)
            state.event(rt, "site_refused", {"site": conn.name, "reason": reason})
            self.link.notify_sites_changed()
        elif isinstance(msg, SiteResult):
            self._on_result(conn, rt, msg)
        elif isinstance(msg, TaskFailed):
            self._settled(rt, msg.task_id, conn.name)
            tb = msg.traceback[-65536:] if msg.traceback else None
            self.link.to_job(rt, _failed(conn.name, msg.task_id, msg.error[:4000], tb))
        elif isinstance(msg, SiteLog):
            path = Path(rt.rec.result_dir) / "sites" / conn.name / "client.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.writelines(f"{line}\n" for line in msg.lines)
        elif isinstance(msg, SiteRecords):
            self.link.to_job(rt, JobRecords(site=conn.name, records=msg.records))

    def _settled(self, rt: JobRuntime, task_id: str, site: str) -> None:
        """The site answered ``task_id`` (or failed it): it owes nothing more for it."""
        with self.state.lock:
            owed = rt.outstanding.get(task_id)
            if owed is not None:
                owed.discard(site)

    def _on_result(self, conn: SiteConn, rt: JobRuntime, msg: SiteResult) -> None:
        self._settled(rt, msg.task_id, conn.name)
        out: JobResult | protocol.JobTaskFailed = JobResult(
            site=conn.name, task_id=msg.task_id, header=msg.header, blob=None
        )
        if msg.blob is not None:
            path = rt.blob_path(msg.blob.id)
            pushed = rt.pushed.pop(msg.blob.id, None)
            if not path.is_file() or pushed is None or pushed != msg.blob.sha256:
                out = _failed(conn.name, msg.task_id, "result upload missing or corrupted")
            else:
                out = JobResult(
                    site=conn.name, task_id=msg.task_id, header=msg.header, blob=str(path)
                )
                self.state.audit.record(
                    "model_received",
                    conn.name,
                    job=rt.rec.id,
                    task=msg.task_id,
                    round=user_round(msg.header.get("current_round")),
                    sha256=msg.blob.sha256,
                    size=path.stat().st_size,
                )
        self.link.to_job(rt, out)

    def _redeploy(self, conn: SiteConn) -> None:
        """A restarted site gets its running jobs again; their jobs learn its tasks are lost
        (and send them again once it is back)."""
        for rt in self.state.jobs.values():
            if rt.finished or conn.name not in rt.rec.sites:
                continue
            rt.deployed.discard(conn.name)
            self.scheduler.deploy_to(rt, conn)
            if rt.ipc is not None:
                self.link.to_job(rt, SiteRestarted(conn.name))

    # ------------------------------------------------------------------ Fetch / Push

    def _site_job(self, ident: Identity, job_id: str) -> JobRuntime:
        rt = self.state.job(job_id)
        if rt is None or ident.name not in rt.rec.sites:
            raise PermissionDenied(f"{ident.name} is not part of job {job_id}")
        return rt

    def Fetch(self, request: bytes, context: Any) -> Iterator[bytes]:
        ident = who(context, "site", self.state.audit)
        with as_status(context):
            req, _ = protocol.decode(request, Fetch)
            rt = self._site_job(ident, req.job)
            known = rt.site_bundle if req.blob == "bundle" else rt.task_blobs.get(req.blob)
            if known is None:
                raise PermissionDenied(f"blob {req.blob!r} is not for sites to fetch")
            path = rt.folder / "site-bundle.zip" if req.blob == "bundle" else rt.blob_path(req.blob)
        if not path.is_file():
            abort(context, "NOT_FOUND", f"blob {req.blob!r} of job {rt.rec.id} is gone")
        yield from rpc.file_frames(path, sha256=known.sha256)

    def Push(self, request_iterator: Any, context: Any) -> bytes:
        ident = who(context, "site", self.state.audit)
        with as_status(context, "upload refused: "):
            req, _ = protocol.decode(next(request_iterator), Push)
            rt = self._site_job(ident, req.job)
            with self.state.lock:
                owed = ident.name in rt.outstanding.get(req.task_id, ())
                limit = rt.result_limit.get(req.task_id, 0)
            if not owed:
                raise PermissionDenied(
                    f"{ident.name} owes no result for task {req.task_id!r} of job {req.job}"
                )
            if req.size > limit:
                raise LimitExceeded(
                    f"result of {req.size} bytes is over this task's limit of {limit}"
                )
            name = f"result.{safe_name(req.task_id)}.{ident.name}"
            _, sha = rpc.receive_file(
                request_iterator,
                rt.blob_path(name),
                max_bytes=req.size,
                expect_size=req.size,
                reuse=True,  # the job process retires a result once it has read it
            )
            with self.state.lock:
                rt.pushed[name] = sha
        return protocol.encode(Stored(name, sha))
