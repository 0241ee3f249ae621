"""The fedctl server: sites, jobs and admins over one mutual-TLS gRPC port.

* **Sites** keep a ``Session`` stream open. Control messages carry sequence numbers and are
  acknowledged; unacknowledged ones are resent when the site reconnects, and duplicates are
  dropped, so a reconnect neither loses nor repeats a task or a result. A site that restarts
  (new incarnation) is sent its running jobs again.
* **Jobs** are stored in SQLite and scheduled once ``min_clients`` sites are connected (a job that
  cannot be scheduled says why). Each runs its workflow in its own process
  (``fedctl.runtime.jobproc``), connected to this one over a private unix socket: several jobs run
  at once and a crashing job cannot take the server down.
* **Blobs** (job bundles, task models, site results) are files in the job's folder, moved in
  chunks by ``Fetch``/``Push``: memory per transfer is one chunk whatever the model size.
* **Admins** use the same port; their identity (and role) comes from their certificate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import safe_name, sha256_file
from fedctl.constants import ENV_JOB_TOKEN, MAX_BLOB_BYTES, MAX_BUNDLE_BYTES
from fedctl.errors import FedctlError, NotFound, PermissionDenied, RecipeError
from fedctl.jobs import new_job_id
from fedctl.runtime import store as st
from fedctl.runtime.audit import AuditLog
from fedctl.runtime.bundle import extract_bundle, make_bundle
from fedctl.runtime.communicator import natural_key
from fedctl.runtime.procs import terminate_group
from fedctl.transport import frames, rpc
from fedctl.transport.frames import FrameError, FrameSocket
from fedctl.transport.reliable import ReliableLink

if TYPE_CHECKING:
    import grpc

    from fedctl.provision.identity import Identity
    from fedctl.provision.kit import Kit

log = logging.getLogger("fedctl.server")

HEARTBEAT = 5.0
SITE_TIMEOUT = 30.0
#: a site offline this long has lost the tasks it was working on
OFFLINE_GRACE = 60.0
#: after a restart, how long an interrupted job waits for all its sites before going on
RESUME_GRACE = 120.0
_BLOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ------------------------------------------------------------------------------------ sites


@dataclass
class SiteConn:
    """A site as the server knows it, across its connections."""

    name: str
    org: str
    incarnation: str = ""
    link: ReliableLink = field(default_factory=ReliableLink)
    connected_at: float = 0.0
    last_seen: float = 0.0
    address: str = ""

    @property
    def online(self) -> bool:
        return self.link.online


@dataclass
class JobRuntime:
    """A scheduled or running job: its process, its IPC connection, its sites' progress."""

    rec: st.JobRecord
    token: str
    proc: subprocess.Popen[bytes] | None = None
    ipc: FrameSocket | None = None
    deployed: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    abort_reason: str | None = None
    task_blobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    site_bundle: dict[str, Any] = field(default_factory=dict)
    #: result blobs uploaded by sites: name → SHA-256 computed while receiving
    pushed: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ server


class Server:
    """The server process's state and its gRPC service implementation."""

    def __init__(
        self,
        kit: Kit,
        workspace: str | os.PathLike[str] | None = None,
        *,
        mode: str = "production",
        max_jobs: int = 4,
        heartbeat: float = HEARTBEAT,
        site_timeout: float = SITE_TIMEOUT,
        max_bundle: int = MAX_BUNDLE_BYTES,
        offline_grace: float = OFFLINE_GRACE,
        allow_server_code: bool = False,
    ) -> None:
        if kit.type != "server":
            raise FedctlError(
                f"{kit.root} is a {kit.type} kit; `fedctl server start` needs the server kit"
            )
        self.kit = kit
        self.ws = (Path(workspace) if workspace else kit.root / "workspace").resolve()
        self.ws.mkdir(parents=True, exist_ok=True)
        (self.ws / "run").mkdir(mode=0o700, exist_ok=True)
        self.mode = mode
        self.max_jobs = max_jobs
        self.heartbeat = heartbeat
        self.site_timeout = site_timeout
        self.max_bundle = max_bundle
        self.offline_grace = offline_grace
        #: whether jobs may run their own code in their job process (server_eval)
        self.allow_server_code = allow_server_code
        self.store = st.JobStore(self.ws / "jobs.db")
        self.audit = AuditLog(self.ws / "audit.jsonl", kit.name)
        self._policy: tuple[float, Any] | None = None
        #: changes every time a server process starts: sites reset their message numbering
        self.server_id = secrets.token_hex(8)
        self.sites: dict[str, SiteConn] = {}
        self.jobs: dict[str, JobRuntime] = {}
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.grpc_server: grpc.Server | None = None
        self.port = 0
        self._ipc_sock: socket.socket | None = None
        self.ipc_path = frames.socket_path("server-jobs")

    # ------------------------------------------------------------------ lifecycle

    def start(self, address: str | None = None) -> int:
        """Bind the gRPC port and the job socket; start the scheduler. Returns the port."""
        import grpc

        from fedctl.transport import tls

        self.started_at = time.time()
        self._recover()
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="fedctl-rpc"),
            options=rpc.SERVER_OPTIONS,
            maximum_concurrent_rpcs=512,
        )
        self.grpc_server.add_generic_rpc_handlers((rpc.generic_handler(self),))
        self.port = tls.add_secure_port(self.grpc_server, self.kit, address)
        self._start_ipc()
        self.grpc_server.start()
        for target in (self._scheduler_loop, self._ipc_accept_loop):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        log.info("server %s listening on port %d", self.kit.name, self.port)
        return self.port

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting work, end job processes, close every stream."""
        self.stopping.set()
        self.wake.set()
        with self.lock:
            runtimes = list(self.jobs.values())
            for conn in self.sites.values():
                conn.link.close()
        for rt in runtimes:
            if rt.proc is not None and rt.proc.poll() is None:
                terminate_group(rt.proc, grace)
        if self.grpc_server is not None:
            self.grpc_server.stop(grace).wait(grace + 1)
        if self._ipc_sock is not None:
            self._ipc_sock.close()
            self.ipc_path.unlink(missing_ok=True)
        self.store.close()

    def _recover(self) -> None:
        """Jobs a previous server process left SCHEDULED or RUNNING are queued again; their job
        process resumes from the last checkpoint in their result folder."""
        for rec in self.store.list((st.RUNNING,)):
            self.store.transition(rec.id, st.SCHEDULED, "server restarted")
        for rec in self.store.list((st.SCHEDULED,)):
            self.store.transition(rec.id, st.SUBMITTED, "server restarted; waiting for sites")
            self.store.add_event(rec.id, "server_restarted", {})

    # ------------------------------------------------------------------ identity

    def _who(self, context: Any, kind: str) -> Identity:
        from fedctl.transport import tls

        try:
            ident = tls.peer_identity(context)
        except PermissionDenied as exc:
            self.audit.record("identity_rejected", None, peer=context.peer(), reason=str(exc))
            _abort(context, "UNAUTHENTICATED", str(exc))
        if ident.type != kind:
            reason = f"{ident.name} holds a {ident.type} certificate; this call needs a {kind}"
            self.audit.record("identity_rejected", ident.name, peer=context.peer(), reason=reason)
            _abort(context, "PERMISSION_DENIED", reason)
        return ident

    # ------------------------------------------------------------------ Session (sites)

    def Session(self, request_iterator: Any, context: Any) -> Any:
        import queue as queue_mod

        ident = self._who(context, "site")
        with _as_status(context, "bad session start: "):
            hello, _ = frames.decode(next(request_iterator), {"hello"})
            incarnation = frames.field(hello, "incarnation", str)
            peer_recv = frames.field(hello, "recv_seq", int)
        outq: queue_mod.Queue[bytes | None] = queue_mod.Queue()
        with self.lock:
            conn = self.sites.get(ident.name)
            if conn is None:
                conn = self.sites[ident.name] = SiteConn(ident.name, ident.org)
            restarted = conn.incarnation != incarnation
            if restarted:  # a new agent process: new numbering, it has none of our messages
                conn.incarnation = incarnation
                conn.link.reset(incoming=True, outgoing=True)
            conn.link.attach(outq)  # closes an older stream of this site
            conn.connected_at = conn.last_seen = time.time()
            conn.address = context.peer()
            conn.link.acked(peer_recv)
            outq.put(
                frames.encode(
                    {
                        "t": "welcome",
                        "server_id": self.server_id,
                        "recv_seq": conn.link.recv_seq,
                        "heartbeat": self.heartbeat,
                    }
                )
            )
            conn.link.resend()
            if restarted:
                self._redeploy(conn)
        log.info("site %s connected from %s", ident.name, context.peer())
        self.audit.record("site_connected", ident.name, peer=context.peer(), restarted=restarted)
        self._notify_sites_changed()
        self.wake.set()
        error: list[str] = []
        reader = threading.Thread(
            target=self._read_site,
            args=(conn, outq, request_iterator, error),
            name=f"site-{ident.name}",
            daemon=True,
        )
        reader.start()
        try:
            while not self.stopping.is_set():
                try:
                    item = outq.get(timeout=self.heartbeat)
                except queue_mod.Empty:
                    item = frames.encode({"t": "heartbeat"})
                if item is None:
                    break
                yield item
        finally:
            conn.link.detach(outq)
            self._notify_sites_changed()
            self.audit.record("site_disconnected", ident.name)
            log.info("site %s disconnected", ident.name)
        if error:
            _abort(context, "INVALID_ARGUMENT", error[0])

    def _read_site(self, conn: SiteConn, outq: Any, requests: Any, error: list[str]) -> None:
        try:
            for raw in requests:
                header, _ = frames.decode(raw)
                conn.last_seen = time.time()
                self._on_site_message(conn, header)
        except FrameError as exc:
            error.append(f"malformed frame from {conn.name}: {exc}")
            log.warning("%s", error[0])
        except Exception as exc:  # the stream ended (cancelled, disconnected)
            log.debug("site %s stream ended: %s", conn.name, exc)
        finally:
            outq.put(None)

    def _send(self, conn: SiteConn, header: dict[str, Any]) -> None:
        """Queue a reliable message for a site (delivered now or when it reconnects)."""
        conn.link.send(header)

    def _on_site_message(self, conn: SiteConn, h: dict[str, Any]) -> None:
        kind = h["t"]
        if kind == "heartbeat":
            return
        if kind == "ack":
            conn.link.acked(frames.field(h, "seq", int))
            return
        if not conn.link.accept(frames.field(h, "seq", int)):
            return  # a resent duplicate: acknowledged again, not processed twice
        job_id = frames.field(h, "job", str)
        with self.lock:
            rt = self.jobs.get(job_id)
        if rt is None or conn.name not in rt.rec.sites:
            log.info("ignoring %s from %s for job %s (not running there)", kind, conn.name, job_id)
            return
        if kind == "deployed":
            self.audit.record("job_deployed", conn.name, job=job_id)
            with self.lock:
                rt.deployed.add(conn.name)
            self._event(rt, "site_deployed", {"site": conn.name})
            self._notify_sites_changed()
        elif kind == "refused":
            reason = str(h.get("reason", ""))[:2000]
            self.audit.record("job_refused", conn.name, job=job_id, reason=reason)
            with self.lock:
                rt.refused[conn.name] = reason
                rt.deployed.discard(conn.name)
            self._event(rt, "site_refused", {"site": conn.name, "reason": reason})
            self._notify_sites_changed()
        elif kind == "result":
            self._on_result(conn, rt, h)
        elif kind == "task_failed":
            error = str(h.get("error", "failed"))[:4000]
            tb = str(h.get("traceback") or "")[:65536] or None
            self._to_job(rt, _failed(conn.name, frames.field(h, "task_id", str), error, tb))
        elif kind == "log":
            lines = h.get("lines")
            if isinstance(lines, list):
                path = Path(rt.rec.result_dir) / "sites" / conn.name / "client.log"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as fh:
                    fh.writelines(f"{line}\n" for line in lines if isinstance(line, str))
        elif kind == "records":
            records = h.get("records")
            if isinstance(records, list):
                self._to_job(rt, {"t": "records", "site": conn.name, "records": records[:10000]})
        else:
            raise FrameError(f"unexpected message type {kind!r}")

    def _on_result(self, conn: SiteConn, rt: JobRuntime, h: dict[str, Any]) -> None:
        task_id = frames.field(h, "task_id", str)
        header = frames.field(h, "header", dict)
        blob = h.get("blob")
        msg: dict[str, Any] = {
            "t": "result",
            "site": conn.name,
            "task_id": task_id,
            "header": header,
        }
        if blob is not None:
            name = frames.field(blob, "id", str, "result blob")
            path = self._blob_path(rt, name)
            pushed = rt.pushed.get(name)
            if not path.is_file() or pushed is None or pushed != blob.get("sha256"):
                msg = _failed(conn.name, task_id, "result upload missing or corrupted")
            else:
                msg["blob"] = str(path)
                self.audit.record(
                    "model_received",
                    conn.name,
                    job=rt.rec.id,
                    task=task_id,
                    round=header.get("current_round"),
                    sha256=blob.get("sha256"),
                    size=path.stat().st_size,
                )
        self._to_job(rt, msg)

    def _redeploy(self, conn: SiteConn) -> None:
        """A restarted site gets its running jobs again; their jobs learn its tasks are lost."""
        for rt in self.jobs.values():
            if rt.finished or conn.name not in rt.rec.sites:
                continue
            rt.deployed.discard(conn.name)
            self._deploy_to(rt, conn)
            if rt.ipc is not None:
                with contextlib.suppress(OSError):
                    rt.ipc.send({"t": "site_restarted", "site": conn.name})

    # ------------------------------------------------------------------ Fetch / Push (blobs)

    def _blob_path(self, rt: JobRuntime, name: str) -> Path:
        if not _BLOB.match(name):
            raise FrameError(f"bad blob name {name!r}")
        return Path(rt.rec.job_dir).parent / "blobs" / name

    def _site_job(self, context: Any, h: dict[str, Any]) -> tuple[Identity, JobRuntime]:
        ident = self._who(context, "site")
        job_id = frames.field(h, "job", str)
        with self.lock:
            rt = self.jobs.get(job_id)
        if rt is None or ident.name not in rt.rec.sites:
            _abort(context, "PERMISSION_DENIED", f"{ident.name} is not part of job {job_id}")
        return ident, rt

    def Fetch(self, request: bytes, context: Any) -> Any:
        with _as_status(context):
            h, _ = frames.decode(request, {"fetch"})
            _, rt = self._site_job(context, h)
            name = frames.field(h, "blob", str)
            if name == "bundle":
                path = Path(rt.rec.job_dir).parent / "site-bundle.zip"
            elif name in rt.task_blobs:
                path = self._blob_path(rt, name)
            else:
                _abort(context, "PERMISSION_DENIED", f"blob {name!r} is not for sites to fetch")
        if not path.is_file():
            _abort(context, "NOT_FOUND", f"blob {name!r} of job {rt.rec.id} is gone")
        known = rt.site_bundle if name == "bundle" else rt.task_blobs[name]
        yield from rpc.file_frames(path, sha256=known.get("sha256"))

    def Push(self, request_iterator: Any, context: Any) -> bytes:
        with _as_status(context, "upload refused: "):
            h, _ = frames.decode(next(request_iterator), {"push"})
            ident, rt = self._site_job(context, h)
            task_id = frames.field(h, "task_id", str)
            size = frames.field(h, "size", int)
            name = f"result.{safe_name(task_id)}.{ident.name}"
            if size > MAX_BLOB_BYTES:
                _abort(context, "RESOURCE_EXHAUSTED", f"result of {size} bytes is over the limit")
            _, sha = rpc.receive_file(
                request_iterator,
                self._blob_path(rt, name),
                max_bytes=min(size, MAX_BLOB_BYTES),
                expect_size=size,
            )
            with self.lock:
                rt.pushed[name] = sha
        return frames.encode({"t": "ok", "blob": name, "sha256": sha})

    # ------------------------------------------------------------------ admin API

    def Admin(self, request: bytes, context: Any) -> bytes:
        ident = self._who(context, "admin")
        with _as_status(context):
            h, _ = frames.decode(request, {"admin"})
            result = self._admin(ident, frames.field(h, "op", str), h)
        return frames.encode({"t": "reply", **result})

    def policy(self) -> Any:
        """The server's local/authorization.yaml (re-read when it changes; default if absent)."""
        from fedctl.provision.policy import default_authorization, load_authorization

        path = self.kit.local_dir / "authorization.yaml"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return default_authorization()
        if self._policy is None or self._policy[0] != mtime:
            self._policy = (mtime, load_authorization(path))
        return self._policy[1]

    def allowed(self, ident: Identity, action: str, rec: st.JobRecord | None = None) -> bool:
        """Whether ``ident`` may do ``action`` (on ``rec``) under the server's policy."""
        from fedctl.provision.identity import Identity as Id

        if ident.type != "admin":
            return False
        policy = self.policy()
        if action == "submit":
            return policy.allows("submit", ident) and policy.allows("byoc", ident)
        if action == "sites":
            return policy.rights(ident.role).view != "none"
        owner = None
        if rec is not None:
            owner = Id(rec.submitter, rec.submitter_org, "admin", rec.extra.get("submitter_role"))
        return policy.allows(action, ident, owner)

    def authorize(self, ident: Identity, action: str, rec: st.JobRecord | None = None) -> None:
        """Raise PermissionDenied (and audit it) unless ``ident`` may do ``action``."""
        if self.allowed(ident, action, rec):
            return
        what = {
            "submit": "submit jobs",
            "view": "see",
            "manage": "manage",
            "download": "download the results of",
            "sites": "list sites",
        }.get(action, action)
        target = f" job {rec.id} (submitted by {rec.submitter})" if rec is not None else ""
        reason = f"{ident.name} (role {ident.role}) may not {what}{target} on this server"
        self.audit.record(
            "access_denied", ident.name, action=action, job=rec.id if rec else None, reason=reason
        )
        raise PermissionDenied(reason)

    def _admin(self, ident: Identity, op: str, h: dict[str, Any]) -> dict[str, Any]:
        self.audit.record("admin_request", ident.name, op=op, job=h.get("job"))
        if op == "list":
            visible = [r for r in self.store.list() if self.allowed(ident, "view", r)]
            return {"jobs": [self._job_summary(r) for r in visible]}
        if op == "sites":
            self.authorize(ident, "sites")
            return {"sites": self._sites_summary()}
        job_id = frames.field(h, "job", str)
        rec = self.store.get(job_id)
        if op == "status":
            self.authorize(ident, "view", rec)
            return {"job": self._job_summary(rec, detail=True)}
        if op == "events":
            self.authorize(ident, "view", rec)
            after = h.get("after", 0)
            return {"events": self.store.events(job_id, after if isinstance(after, int) else 0)}
        if op == "abort":
            self.authorize(ident, "manage", rec)
            return {"job": self._job_summary(self.abort(job_id, f"aborted by {ident.name}"))}
        raise FrameError(f"unknown admin operation {op!r}")

    def AdminUpload(self, request_iterator: Any, context: Any) -> bytes:
        ident = self._who(context, "admin")
        with _as_status(context, "submission refused: "):
            h, _ = frames.decode(next(request_iterator), {"submit"})
            size = frames.field(h, "size", int)
            sha = frames.field(h, "sha256", str)
            seed = frames.field(h, "seed", int)
            self.audit.record("admin_request", ident.name, op="submit", size=size, sha256=sha)
            self.authorize(ident, "submit")
            if size > self.max_bundle:
                _abort(
                    context,
                    "RESOURCE_EXHAUSTED",
                    f"job bundle of {size} bytes is over the server's limit of {self.max_bundle}",
                )
            staging = self.ws / "incoming" / secrets.token_hex(8)
            try:
                _, got = rpc.receive_file(
                    request_iterator,
                    staging / "bundle.zip",
                    max_bytes=size,
                    expect_size=size,
                    expect_sha256=sha,
                )
                rec = self.submit(staging / "bundle.zip", ident, seed, got)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return frames.encode({"t": "reply", "job": self._job_summary(rec)})

    def AdminStream(self, request: bytes, context: Any) -> Any:
        ident = self._who(context, "admin")
        with _as_status(context):
            h, _ = frames.decode(request, {"download", "follow", "logs"})
            job_id = frames.field(h, "job", str)
            rec = self.store.get(job_id)
            self.authorize(ident, "download" if h["t"] == "download" else "view", rec)
        if h["t"] == "download":
            zip_path = self._result_zip(rec)
            try:
                yield from rpc.file_frames(zip_path, {"t": "download", "state": rec.state})
            finally:
                zip_path.unlink(missing_ok=True)
            return
        if h["t"] == "logs":
            yield from self._logs(rec, h, context)
            return
        after = h.get("after", 0) if isinstance(h.get("after"), int) else 0
        while context.is_active():
            events = self.store.events(job_id, after)
            for ev in events:
                after = ev["seq"]
                yield frames.encode({"t": "event", **ev})
            state = self.store.get(job_id).state
            if not events and state in st.TERMINAL:
                yield frames.encode({"t": "end", "state": state})
                return
            if not events:
                time.sleep(0.2)

    def _logs(self, rec: st.JobRecord, h: dict[str, Any], context: Any) -> Any:
        """A job's log (or one site's script output), then new lines while ``follow``."""
        site = h.get("site")
        root = Path(rec.result_dir)
        if site is None:
            path = root / "run.log"
        elif isinstance(site, str) and site in rec.sites:
            path = root / "sites" / site / "client.log"
        else:
            _abort(context, "NOT_FOUND", f"job {rec.id} has no site {site!r} (sites: {rec.sites})")
        follow = bool(h.get("follow"))
        pos = 0
        while context.is_active():
            data = b""
            if path.is_file():
                with open(path, "rb") as fh:
                    fh.seek(pos)
                    data = fh.read(frames.CHUNK)
            if data:
                cut = data.rfind(b"\n") + 1 if follow else len(data)
                if cut:
                    pos += cut
                    yield frames.encode({"t": "log"}, data[:cut])
                    continue
            state = self.store.get(rec.id).state
            if not follow or state in st.TERMINAL:
                yield frames.encode({"t": "end", "state": state})
                return
            time.sleep(0.3)

    def _result_zip(self, rec: st.JobRecord) -> Path:
        root = Path(rec.result_dir)
        out = self.ws / "run" / f"download-{secrets.token_hex(6)}.zip"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            if root.is_dir():
                for path in sorted(root.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        zf.write(path, path.relative_to(root).as_posix())
            zf.writestr("job.json", json.dumps(self._job_summary(rec, detail=True), indent=2))
        return out

    # ------------------------------------------------------------------ jobs

    def submit(
        self, bundle: Path, ident: Identity, seed: int = 0, sha256: str | None = None
    ) -> st.JobRecord:
        """Store a submitted bundle as a new job (validated: safe paths, hashes, spec)."""
        from fedctl.recipe.jobfolder import load_job

        staging = bundle.parent / "job"
        extract_bundle(bundle, staging, max_bytes=self.max_bundle)  # checks every file's hash
        recipe = load_job(staging, verify=False)  # the arguments, through the recipe class
        server_code = getattr(recipe, "server_eval", None)
        if server_code and not self.allow_server_code:
            reason = (
                f"this server does not run code from jobs (server_eval={server_code!r}); "
                "an operator can allow it with `fedctl server start --allow-server-code`"
            )
            self.audit.record("access_denied", ident.name, action="server_code", reason=reason)
            raise PermissionDenied(reason)
        job_id = new_job_id(recipe.name)
        root = self.ws / "jobs" / job_id
        root.mkdir(parents=True)
        (root / "blobs").mkdir()
        os.replace(staging, root / "job")
        os.replace(bundle, root / "bundle.zip")
        rec = st.JobRecord(
            id=job_id,
            name=recipe.name,
            kind=recipe.kind,
            submitter=ident.name,
            submitter_org=ident.org,
            state=st.SUBMITTED,
            reason="waiting to be scheduled",
            submitted_at=time.time(),
            scheduled_at=None,
            started_at=None,
            finished_at=None,
            job_dir=str(root / "job"),
            result_dir=str(root / "result"),
            min_clients=recipe.min_clients,
            num_rounds=recipe.num_rounds,
            seed=seed,
            bundle_sha256=sha256 or sha256_file(root / "bundle.zip"),
            bundle_size=(root / "bundle.zip").stat().st_size,
            extra={"submitter_role": ident.role},
        )
        self.store.add(rec)
        self.audit.record(
            "job_submitted",
            ident.name,
            job=job_id,
            name=recipe.name,
            kind=recipe.kind,
            bundle_sha256=rec.bundle_sha256,
            bundle_size=rec.bundle_size,
        )
        self.store.add_event(job_id, "submitted", {"by": ident.name})
        self.wake.set()
        return rec

    def abort(self, job_id: str, reason: str) -> st.JobRecord:
        """Abort a job in any non-final state."""
        rec = self.store.get(job_id)
        if rec.state in st.TERMINAL:
            raise FedctlError(f"job {job_id} already {rec.state}")
        with self.lock:
            rt = self.jobs.get(job_id)
        if rt is None:
            rec = self.store.transition(job_id, st.ABORTED, reason)
            self.store.add_event(job_id, "run_finished", {"status": st.ABORTED, "reason": reason})
            return rec
        rt.abort_reason = reason
        self.audit.record("job_abort_requested", None, job=job_id, reason=reason)
        if rt.ipc is not None:
            with contextlib.suppress(OSError):
                rt.ipc.send({"t": "abort", "reason": reason})
        deadline = time.time() + 15
        while time.time() < deadline and not rt.finished:
            time.sleep(0.05)
        if not rt.finished:
            if rt.proc is not None:
                terminate_group(rt.proc, 2)
            self._finish(rt, st.ABORTED, reason)
        return self.store.get(job_id)

    def _scheduler_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(0.5)
            self.wake.clear()
            try:
                self._check_sites()
                self._check_processes()
                self._schedule()
            except Exception:
                log.exception("scheduler pass failed")

    def _online_sites(self) -> list[str]:
        with self.lock:
            return sorted((n for n, c in self.sites.items() if c.online), key=natural_key)

    def _schedule(self) -> None:
        for rec in self.store.list((st.SUBMITTED,)):
            with self.lock:
                running = sum(1 for rt in self.jobs.values() if not rt.finished)
            if running >= self.max_jobs:
                limit = f"the server runs at most {self.max_jobs}"
                self._waiting(rec, f"waiting: {running} jobs running ({limit})")
                continue
            online = self._online_sites()
            if rec.sites:
                # A job interrupted by a server restart keeps its sites (and so each site's
                # index and data): wait for all of them, then go on with those that came back.
                missing = [s for s in rec.sites if s not in online]
                back = [s for s in rec.sites if s in online]
                waited = time.time() - self.started_at
                if missing and (waited < RESUME_GRACE or len(back) < rec.min_clients):
                    self._waiting(rec, f"resuming: waiting for {', '.join(missing)} to reconnect")
                    continue
                self._launch(rec, back)
                continue
            if len(online) < rec.min_clients:
                who = f"{len(online)} ({', '.join(online) or 'none'})"
                self._waiting(rec, f"waiting for sites: needs {rec.min_clients}, connected {who}")
                continue
            self._launch(rec, online)

    def _waiting(self, rec: st.JobRecord, reason: str) -> None:
        """Say why a submitted job is not scheduled yet (written only when it changes)."""
        if rec.reason != reason:
            self.store.update(rec.id, reason=reason)

    def _launch(self, rec: st.JobRecord, sites: list[str]) -> None:
        rec = self.store.transition(rec.id, st.SCHEDULED, None, sites=sites)
        rt = JobRuntime(rec, token=secrets.token_hex(16))
        site_bundle = Path(rec.job_dir).parent / "site-bundle.zip"
        if site_bundle.exists():  # a job resumed after a restart
            sha = sha256_file(site_bundle)
        else:
            sha = make_bundle(rec.job_dir, site_bundle, with_model=False)
        rt.site_bundle = {"id": "bundle", "size": site_bundle.stat().st_size, "sha256": sha}
        with self.lock:
            self.jobs[rec.id] = rt
        self._event(rt, "scheduled", {"sites": sites})
        self.audit.record("job_scheduled", None, job=rec.id, sites=sites)
        log_path = Path(rec.job_dir).parent / "job.log"
        env = {**os.environ, ENV_JOB_TOKEN: rt.token, "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable,
            "-m",
            "fedctl.runtime.jobproc",
            "--job-id",
            rec.id,
            "--job-dir",
            rec.job_dir,
            "--result-dir",
            rec.result_dir,
            "--socket",
            str(self.ipc_path),
        ]
        with open(log_path, "ab") as out:
            rt.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        for name in sites:
            with self.lock:
                conn = self.sites.get(name)
            if conn is not None:
                self._deploy_to(rt, conn)

    def _deploy_to(self, rt: JobRuntime, conn: SiteConn) -> None:
        sites = rt.rec.sites
        self._send(
            conn,
            {
                "t": "deploy",
                "job": rt.rec.id,
                "name": rt.rec.name,
                "bundle": rt.site_bundle,
                "site_index": sites.index(conn.name),
                "num_sites": len(sites),
                "seed": rt.rec.seed,
                "mode": self.mode,
                "submitter": {
                    "name": rt.rec.submitter,
                    "org": rt.rec.submitter_org,
                    "role": rt.rec.extra.get("submitter_role"),
                },
            },
        )

    def _check_sites(self) -> None:
        now = time.time()
        with self.lock:
            for conn in self.sites.values():
                if conn.online and now - conn.last_seen > self.site_timeout:
                    log.warning(
                        "site %s silent for %.0fs; dropping its stream",
                        conn.name,
                        now - conn.last_seen,
                    )
                    conn.link.close()

    def _check_processes(self) -> None:
        with self.lock:
            runtimes = [rt for rt in self.jobs.values() if not rt.finished]
        for rt in runtimes:
            if rt.proc is not None and rt.proc.poll() is not None and not rt.finished:
                tail = _tail(Path(rt.rec.job_dir).parent / "job.log")
                reason = rt.abort_reason or f"job process exited with code {rt.proc.returncode}"
                if tail and not rt.abort_reason:
                    reason += f": {tail}"
                self._finish(rt, st.ABORTED if rt.abort_reason else st.FAILED, reason)

    def _finish(self, rt: JobRuntime, state: str, reason: str | None) -> None:
        with self.lock:
            if rt.finished:
                return
            rt.finished = True
        cur = self.store.get(rt.rec.id)
        if cur.state == st.SCHEDULED and state == st.FINISHED:
            self.store.transition(rt.rec.id, st.RUNNING)
        if cur.state not in st.TERMINAL:
            self.store.transition(rt.rec.id, state, reason)
        self._event(rt, "run_finished", {"status": state, "reason": reason})
        self.audit.record("job_finished", None, job=rt.rec.id, status=state, reason=reason)
        for name in rt.rec.sites:
            with self.lock:
                conn = self.sites.get(name)
            if conn is not None:
                self._send(conn, {"t": "end_job", "job": rt.rec.id, "status": state})
        if rt.ipc is not None:
            rt.ipc.close()
        log.info("job %s %s%s", rt.rec.id, state, f": {reason}" if reason else "")
        self.wake.set()

    def _event(self, rt: JobRuntime, kind: str, data: dict[str, Any]) -> None:
        self.store.add_event(rt.rec.id, kind, data)

    def _job_summary(self, rec: st.JobRecord, detail: bool = False) -> dict[str, Any]:
        out = {
            "id": rec.id,
            "name": rec.name,
            "kind": rec.kind,
            "state": rec.state,
            "reason": rec.reason,
            "submitter": rec.submitter,
            "submitted_at": rec.submitted_at,
            "round": rec.round,
            "num_rounds": rec.num_rounds,
            "sites": rec.sites,
        }
        if detail:
            with self.lock:
                rt = self.jobs.get(rec.id)
                deployed = sorted(rt.deployed) if rt else []
                refused = dict(rt.refused) if rt else {}
            out.update(
                metrics=rec.metrics,
                started_at=rec.started_at,
                finished_at=rec.finished_at,
                min_clients=rec.min_clients,
                seed=rec.seed,
                deployed=deployed,
                refused=refused,
                result_dir=rec.result_dir,
            )
        return out

    def _sites_summary(self) -> list[dict[str, Any]]:
        with self.lock:
            running = {
                name: sorted(
                    rt.rec.id
                    for rt in self.jobs.values()
                    if not rt.finished and name in rt.rec.sites
                )
                for name in self.sites
            }
            return [
                {
                    "name": c.name,
                    "org": c.org,
                    "online": c.online,
                    "address": c.address,
                    "connected_at": c.connected_at,
                    "last_heartbeat": c.last_seen,
                    "jobs": running[c.name],
                }
                for c in sorted(self.sites.values(), key=lambda c: natural_key(c.name))
            ]

    # ------------------------------------------------------------------ job processes (IPC)

    def _start_ipc(self) -> None:
        self._ipc_sock = frames.listen_unix(self.ipc_path, 64)

    def _ipc_accept_loop(self) -> None:
        assert self._ipc_sock is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self._ipc_sock.accept()
            except OSError:
                return
            threading.Thread(target=self._ipc_serve, args=(FrameSocket(conn),), daemon=True).start()

    def _ipc_serve(self, fs: FrameSocket) -> None:
        rt: JobRuntime | None = None
        try:
            first = fs.recv({"hello"})
            if first is None:
                return
            h = first[0]
            with self.lock:
                rt = self.jobs.get(str(h.get("job")))
            if rt is None or not secrets.compare_digest(str(h.get("token")), rt.token):
                fs.send({"t": "error", "message": "unknown job or bad token"})
                return
            if rt.finished:
                fs.send({"t": "abort", "reason": rt.abort_reason or "job already ended"})
                return
            rt.ipc = fs
            self.store.transition(rt.rec.id, st.RUNNING)
            fs.send(
                {
                    "t": "start",
                    "sites": rt.rec.sites,
                    "seed": rt.rec.seed,
                    "offline_grace": self.offline_grace,
                }
            )
            self._notify_job_sites(rt)
            while True:
                msg = fs.recv()
                if msg is None:
                    return
                self._on_job_message(rt, msg[0])
        except (OSError, FedctlError) as exc:
            if rt is None or not rt.finished:
                log.warning("job connection ended: %s", exc)
        finally:
            if rt is not None:
                fs.close()

    def _on_job_message(self, rt: JobRuntime, h: dict[str, Any]) -> None:
        kind = h["t"]
        if kind == "dispatch":
            task_id = frames.field(h, "task_id", str)
            blob = h.get("blob")
            blob_info = None
            if blob is not None:
                path = self._blob_path(rt, str(blob))
                known = h.get("blob_info") if isinstance(h.get("blob_info"), dict) else {}
                blob_info = {
                    "id": path.name,
                    "size": path.stat().st_size,
                    # the job process hashed the file while writing it; hash here otherwise
                    "sha256": known.get("sha256") or sha256_file(path),
                }
                rt.task_blobs[path.name] = blob_info
            header = frames.field(h, "header", dict)
            self.audit.record(
                "model_sent",
                None,
                job=rt.rec.id,
                task=task_id,
                task_name=h.get("name"),
                round=header.get("current_round"),
                sites=h.get("targets"),
                sha256=blob_info["sha256"] if blob_info else None,
                size=blob_info["size"] if blob_info else None,
            )
            for name in frames.field(h, "targets", list):
                with self.lock:
                    conn = self.sites.get(name)
                if conn is None or name not in rt.rec.sites:
                    self._to_job(rt, _failed(name, task_id, "site is not part of this job"))
                    continue
                self._send(
                    conn,
                    {
                        "t": "task",
                        "job": rt.rec.id,
                        "task_id": task_id,
                        "name": frames.field(h, "name", str),
                        "header": header,
                        "blob": blob_info,
                    },
                )
        elif kind == "cancel":
            task_id = frames.field(h, "task_id", str)
            for name in frames.field(h, "sites", list):
                with self.lock:
                    conn = self.sites.get(name)
                if conn is not None:
                    self._send(conn, {"t": "cancel", "job": rt.rec.id, "task_id": task_id})
        elif kind == "event":
            event = frames.field(h, "event", dict)
            ev_kind = str(event.get("event", "event"))
            self.store.add_event(
                rt.rec.id, ev_kind, {k: v for k, v in event.items() if k != "event"}
            )
            if ev_kind == "round_started":
                self.store.update(rt.rec.id, round=event.get("round"))
            elif ev_kind == "round_completed":
                self.store.update(rt.rec.id, metrics=event.get("metrics") or {})
        elif kind == "finished":
            status = frames.field(h, "status", str)
            if status not in st.TERMINAL:
                raise FrameError(f"bad final status {status!r}")
            reason = h.get("reason")
            if rt.abort_reason:
                status, reason = st.ABORTED, rt.abort_reason
            self._finish(rt, status, reason)
        else:
            raise FrameError(f"unexpected job message {kind!r}")

    def _to_job(self, rt: JobRuntime, msg: dict[str, Any]) -> None:
        if rt.ipc is not None:
            try:
                rt.ipc.send(msg)
            except OSError:
                log.warning("job %s: its process is gone; dropping %s", rt.rec.id, msg["t"])

    def _notify_job_sites(self, rt: JobRuntime) -> None:
        if rt.ipc is None:
            return
        with self.lock:
            online = {n for n, c in self.sites.items() if c.online}
            msg = {
                "t": "sites",
                "ready": sorted((s for s in rt.deployed if s in online), key=natural_key),
                "refused": dict(rt.refused),
                "offline": sorted((s for s in rt.rec.sites if s not in online), key=natural_key),
            }
        with contextlib.suppress(OSError):
            rt.ipc.send(msg)

    def _notify_sites_changed(self) -> None:
        with self.lock:
            runtimes = [rt for rt in self.jobs.values() if not rt.finished]
        for rt in runtimes:
            self._notify_job_sites(rt)


# ------------------------------------------------------------------------------------ helpers


def _failed(site: str, task_id: str, error: str, tb: str | None = None) -> dict[str, Any]:
    """The message that tells a job process a site's task failed."""
    return {"t": "failed", "site": site, "task_id": task_id, "error": error, "traceback": tb}


@contextlib.contextmanager
def _as_status(context: Any, prefix: str = "") -> Iterator[None]:
    """Turn fedctl errors raised by a handler into the gRPC status the client maps back."""
    try:
        yield
    except (FrameError, StopIteration) as exc:
        _abort(context, "INVALID_ARGUMENT", f"{prefix}{exc}")
    except PermissionDenied as exc:
        _abort(context, "PERMISSION_DENIED", str(exc))
    except NotFound as exc:
        _abort(context, "NOT_FOUND", str(exc))
    except RecipeError as exc:  # bad job bundles and specs
        _abort(context, "INVALID_ARGUMENT", f"{prefix}{exc}")
    except FedctlError as exc:
        _abort(context, "FAILED_PRECONDITION", str(exc))


def _abort(context: Any, code: str, message: str) -> Any:
    import grpc

    context.abort(getattr(grpc.StatusCode, code), message)


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[:500]


def serve(kit_dir: str | os.PathLike[str], workspace: str | None = None, **kwargs: Any) -> None:
    """Run a server from a kit until SIGTERM/SIGINT (what ``fedctl server start`` calls)."""
    # gRPC's C core logs every refused handshake at INFO on stderr; fedctl reports them itself.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fedctl.transport import tls

    kit = tls.load_kit(kit_dir)
    server = Server(kit, workspace, **kwargs)
    server.start()
    pid_file = server.ws / "run" / "server.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"fedctl server {kit.name} listening on {kit.listen_host}:{server.port}", flush=True)
    try:
        done.wait()
    finally:
        server.stop()
        pid_file.unlink(missing_ok=True)
