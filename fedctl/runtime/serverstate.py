"""What the server's parts share: its sites, its running jobs, its store, audit trail and lock.

The server (:mod:`fedctl.runtime.server`) is wired from parts that each own one job —
site sessions, the admin API, authorization, the scheduler, the link to job processes — and
meet here: a :class:`ServerState` holds the state they share, under one lock.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.codec.frames import FrameError, FrameSocket
from fedctl.codec.protocol import BlobInfo, Numbered
from fedctl.constants import MAX_BUNDLE_BYTES
from fedctl.runtime import store as st
from fedctl.runtime.audit import AuditLog, HeadSigner
from fedctl.transport.local import socket_path
from fedctl.transport.reliable import ReliableLink

if TYPE_CHECKING:
    from fedctl.provision.kit import Kit

HEARTBEAT = 5.0
SITE_TIMEOUT = 30.0
#: a site offline this long has lost the tasks it was working on
OFFLINE_GRACE = 60.0
#: after a restart, how long an interrupted job waits for all its sites before going on
RESUME_GRACE = 120.0


@dataclass
class ServerConfig:
    """How a server runs (the options of ``fedctl server start``)."""

    mode: str = "production"
    max_jobs: int = 4
    heartbeat: float = HEARTBEAT
    site_timeout: float = SITE_TIMEOUT
    max_bundle: int = MAX_BUNDLE_BYTES
    offline_grace: float = OFFLINE_GRACE
    #: whether jobs may run their own code in their job process (server_eval)
    allow_server_code: bool = False


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
    #: task models sites may fetch, by blob id
    task_blobs: dict[str, BlobInfo] = field(default_factory=dict)
    #: the job's bundle as sites fetch it (without the initial model)
    site_bundle: BlobInfo | None = None
    #: task id → sites that owe a result for it (only they may upload one)
    outstanding: dict[str, set[str]] = field(default_factory=dict)
    #: task id → the largest result a site may upload for it
    result_limit: dict[str, int] = field(default_factory=dict)
    #: result blobs uploaded by sites: name → SHA-256 computed while receiving
    pushed: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The job's folder on the server (``<workspace>/jobs/<id>``)."""
        return Path(self.rec.job_dir).parent

    def blob_path(self, name: str) -> Path:
        """Where the blob ``name`` (a task model or a result) lives; FrameError if unsafe."""
        if not _safe_blob_name(name):
            raise FrameError(f"bad blob name {name!r}")
        return self.folder / "blobs" / name


def _safe_blob_name(name: str) -> bool:
    return (
        0 < len(name) <= 128
        and name[0].isalnum()
        and name.isascii()
        and all(c.isalnum() or c in "._-" for c in name)
    )


class ServerState:
    """The state the server's parts share (see the module docstring)."""

    def __init__(self, kit: Kit, workspace: str | os.PathLike[str] | None, config: ServerConfig):
        self.kit = kit
        self.config = config
        self.ws = (Path(workspace) if workspace else kit.root / "workspace").resolve()
        self.ws.mkdir(parents=True, exist_ok=True)
        (self.ws / "run").mkdir(mode=0o700, exist_ok=True)
        self.store = st.JobStore(self.ws / "jobs.db")
        # the head is signed with the kit's own key: cutting records off the end and
        # rewriting the head needs that key (docs/runtime.md, "Audit trail")
        self.audit = AuditLog(self.ws / "audit.jsonl", kit.name, HeadSigner.from_kit(kit))
        #: changes every time a server process starts: sites reset their message numbering
        self.server_id = secrets.token_hex(8)
        self.sites: dict[str, SiteConn] = {}
        self.jobs: dict[str, JobRuntime] = {}
        self.lock = threading.RLock()
        #: wakes the scheduler (a site came, a job was submitted or ended)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.started_at = 0.0
        #: the private unix socket job processes connect back on
        self.ipc_path = socket_path("server-jobs")

    def job(self, job_id: str) -> JobRuntime | None:
        """The runtime of a scheduled or running job (None otherwise)."""
        with self.lock:
            return self.jobs.get(job_id)

    def site(self, name: str) -> SiteConn | None:
        """A site that has connected at least once since the server started."""
        with self.lock:
            return self.sites.get(name)

    def send_to_site(self, name: str, msg: Numbered) -> bool:
        """Queue a reliable message for a site (delivered now or when it reconnects); False
        if the site never connected."""
        conn = self.site(name)
        if conn is None:
            return False
        conn.link.send(msg)
        return True

    def online(self) -> set[str]:
        """Names of the sites connected now."""
        with self.lock:
            return {n for n, c in self.sites.items() if c.online}

    def running(self) -> list[JobRuntime]:
        """Jobs scheduled or running (not yet finished)."""
        with self.lock:
            return [rt for rt in self.jobs.values() if not rt.finished]

    def event(self, rt: JobRuntime, kind: str, data: dict[str, Any]) -> None:
        """Append to the job's event log (what `job status` and followers read)."""
        self.store.add_event(rt.rec.id, kind, data)
