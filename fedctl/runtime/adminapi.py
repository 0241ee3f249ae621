"""The admin API on the server: submit, list, status, events, abort, sites, logs, download.

Admins use the same port as sites; their identity (and role) comes from their certificate, and
every call is checked by :class:`~fedctl.runtime.authz.Authorizer` and written to the audit
trail. ``AdminUpload`` takes a job bundle in chunks; ``AdminStream`` streams a job's events,
its logs or its result folder.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.codec import frames, protocol
from fedctl.codec.frames import FrameError
from fedctl.codec.protocol import (
    AdminRequest,
    Download,
    Follow,
    JobEvent,
    LogPiece,
    Logs,
    Reply,
    StreamEnd,
    Submit,
)
from fedctl.errors import NotFound
from fedctl.jobs import TERMINAL
from fedctl.runtime.rpcstatus import LimitExceeded, as_status, who
from fedctl.transport import rpc

if TYPE_CHECKING:
    from fedctl.provision.identity import Identity
    from fedctl.runtime import store as st
    from fedctl.runtime.authz import Authorizer
    from fedctl.runtime.scheduler import Scheduler
    from fedctl.runtime.serverstate import ServerState

#: admin operations and whether they name a job
OPS = {"list": False, "sites": False, "status": True, "events": True, "abort": True}


class AdminApi:
    """The ``Admin``, ``AdminUpload`` and ``AdminStream`` handlers (see the module docstring)."""

    def __init__(self, state: ServerState, scheduler: Scheduler, authz: Authorizer) -> None:
        self.state = state
        self.scheduler = scheduler
        self.authz = authz

    def Admin(self, request: bytes, context: Any) -> bytes:
        ident = who(context, "admin", self.state.audit)
        with as_status(context):
            req, _ = protocol.decode(request, AdminRequest)
            data = self._admin(ident, req)
        return protocol.encode(Reply(data))

    def _admin(self, ident: Identity, req: AdminRequest) -> dict[str, Any]:
        store = self.state.store
        if req.op not in OPS:
            raise FrameError(f"unknown admin operation {req.op!r} (one of {', '.join(OPS)})")
        self.state.audit.record("admin_request", ident.name, op=req.op, job=req.job)
        if req.op == "list":
            visible = [r for r in store.list() if self.authz.allowed(ident, "view", r)]
            return {"jobs": [self.scheduler.job_summary(r) for r in visible]}
        if req.op == "sites":
            self.authz.authorize(ident, "sites")
            return {"sites": self.scheduler.sites_summary()}
        if req.job is None:
            raise FrameError(f"admin operation {req.op!r} needs a job id")
        rec = store.get(req.job)
        if req.op == "status":
            self.authz.authorize(ident, "view", rec)
            return {"job": self.scheduler.job_summary(rec, detail=True)}
        if req.op == "events":
            self.authz.authorize(ident, "view", rec)
            return {"events": store.events(req.job, req.after)}
        self.authz.authorize(ident, "manage", rec)
        aborted = self.scheduler.abort(req.job, f"aborted by {ident.name}")
        return {"job": self.scheduler.job_summary(aborted)}

    def AdminUpload(self, request_iterator: Any, context: Any) -> bytes:
        ident = who(context, "admin", self.state.audit)
        with as_status(context, "submission refused: "):
            req, _ = protocol.decode(next(request_iterator), Submit)
            self.state.audit.record(
                "admin_request", ident.name, op="submit", size=req.size, sha256=req.sha256
            )
            self.authz.authorize(ident, "submit")
            limit = self.state.config.max_bundle
            if req.size > limit:
                raise LimitExceeded(
                    f"job bundle of {req.size} bytes is over the server's limit of {limit}"
                )
            staging = self.state.ws / "incoming" / secrets.token_hex(8)
            try:
                _, got = rpc.receive_file(
                    request_iterator,
                    staging / "bundle.zip",
                    max_bytes=req.size,
                    expect_size=req.size,
                    expect_sha256=req.sha256,
                )
                rec = self.scheduler.submit(staging / "bundle.zip", ident, req.seed, got)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return protocol.encode(Reply({"job": self.scheduler.job_summary(rec)}))

    def AdminStream(self, request: bytes, context: Any) -> Iterator[bytes]:
        ident = who(context, "admin", self.state.audit)
        with as_status(context):
            req, _ = protocol.decode(request, Download, Follow, Logs)
            rec = self.state.store.get(req.job)
            action = "download" if isinstance(req, Download) else "view"
            self.authz.authorize(ident, action, rec)
            if isinstance(req, Logs):
                path = self._log_path(rec, req.site)
        if isinstance(req, Download):
            zip_path = self._result_zip(rec)
            try:
                yield from rpc.file_frames(zip_path, Download(rec.id, rec.state))
            finally:
                zip_path.unlink(missing_ok=True)
        elif isinstance(req, Logs):
            yield from self._logs(rec, path, req.follow, context)
        else:
            yield from self._follow(rec, req.after, context)

    def _follow(self, rec: st.JobRecord, after: int, context: Any) -> Iterator[bytes]:
        store = self.state.store
        while context.is_active():
            events = store.events(rec.id, after)
            for ev in events:
                after = ev["seq"]
                yield protocol.encode(JobEvent(ev))
            state = store.get(rec.id).state
            if not events and state in TERMINAL:
                yield protocol.encode(StreamEnd(state))
                return
            if not events:
                time.sleep(0.2)

    def _log_path(self, rec: st.JobRecord, site: str | None) -> Path:
        root = Path(rec.result_dir)
        if site is None:
            return root / "run.log"
        if site in rec.sites:
            return root / "sites" / site / "client.log"
        raise NotFound(f"job {rec.id} has no site {site!r} (sites: {rec.sites})")

    def _logs(self, rec: st.JobRecord, path: Path, follow: bool, context: Any) -> Iterator[bytes]:
        """A job's log (or one site's script output), then new lines while ``follow``."""
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
                    yield protocol.encode(LogPiece(), data[:cut])
                    continue
            state = self.state.store.get(rec.id).state
            if not follow or state in TERMINAL:
                yield protocol.encode(StreamEnd(state))
                return
            time.sleep(0.3)

    def _result_zip(self, rec: st.JobRecord) -> Path:
        root = Path(rec.result_dir)
        out = self.state.ws / "run" / f"download-{secrets.token_hex(6)}.zip"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            if root.is_dir():
                for path in sorted(root.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        zf.write(path, path.relative_to(root).as_posix())
            summary = self.scheduler.job_summary(rec, detail=True)
            zf.writestr("job.json", json.dumps(summary, indent=2))
        return out
