"""The site agent: ``fedctl client start --kit DIR``.

It keeps a mutual-TLS session with the server (reconnecting with backoff) and, for each job the
server deploys here, runs a :class:`~fedctl.runtime.sitejob.SiteJob`: the bundle fetched and
checked, the job's client script run as a subprocess, its tasks, results, logs and metrics
relayed. Control messages are numbered and acknowledged in both directions, so a reconnect
neither loses nor repeats one; each result is uploaded as a file in chunks before it is
announced, and a download or upload the connection drops under is done again on the next
session.

Site folder (``<kit>/workspace`` by default)::

    jobs/<job>/job/       the unpacked job (code, spec)
    jobs/<job>/work/      the script's working directory (its state, its files)
    jobs/<job>/blobs/     task models received, results to upload
    jobs/<job>/client.log the script's output
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedctl.codec import protocol
from fedctl.codec.protocol import (
    Ack,
    BlobInfo,
    CancelTask,
    Deploy,
    EndJob,
    Fetch,
    Heartbeat,
    Numbered,
    Push,
    SiteHello,
    SiteTask,
    Stored,
    TaskFailed,
    Welcome,
)
from fedctl.constants import MAX_BUNDLE_BYTES
from fedctl.errors import FedctlError
from fedctl.privacy.policy import load_policy
from fedctl.runtime.audit import AuditLog, HeadSigner
from fedctl.runtime.bundle import BundleError
from fedctl.runtime.sitejob import SiteJob, stop_leftover_scripts
from fedctl.transport import rpc
from fedctl.transport.reliable import ReliableLink

if TYPE_CHECKING:
    from fedctl.provision.kit import Kit

log = logging.getLogger("fedctl.agent")

T = TypeVar("T")
#: tries of one blob transfer when the connection drops under it (each waits for a session)
TRANSFER_ATTEMPTS = 5

SERVER_MESSAGES = (Welcome, Heartbeat, Ack, Deploy, SiteTask, CancelTask, EndJob)


class SiteAgent:
    """One site's connection to the server and its running jobs."""

    def __init__(
        self,
        kit: Kit,
        workspace: str | os.PathLike[str] | None = None,
        *,
        address: str | None = None,
        max_bundle: int = MAX_BUNDLE_BYTES,
    ) -> None:
        if kit.type != "site":
            raise FedctlError(
                f"{kit.root} is a {kit.type} kit; `fedctl client start` needs a site kit"
            )
        self.kit = kit
        self.address = address
        self.ws = (Path(workspace) if workspace else kit.root / "workspace").resolve()
        self.ws.mkdir(parents=True, exist_ok=True)
        # the head is signed with the kit's own key: cutting records off the end and
        # rewriting the head needs that key (docs/runtime.md, "Audit trail")
        self.audit = AuditLog(self.ws / "audit.jsonl", kit.name, HeadSigner.from_kit(kit))
        self.max_bundle = max_bundle
        self.incarnation = secrets.token_hex(8)
        self.server_id: str | None = None
        self.link = ReliableLink()
        self.jobs: dict[str, SiteJob] = {}
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.stubs: rpc.Stubs | None = None
        #: the site's own privacy policy (local/privacy.yaml): refused now if it is not valid
        self.privacy = load_policy(kit.local_dir / "privacy.yaml")
        # scripts of an earlier agent process of this site that is gone (killed, crashed)
        stop_leftover_scripts(self.ws)

    # ------------------------------------------------------------------ connection

    def run(self) -> None:
        """Connect, serve, reconnect with backoff, until :meth:`stop`."""
        import grpc

        from fedctl.transport import tls

        backoff = 0.5
        while not self.stopping.is_set():
            channel = tls.secure_channel(self.kit, self.address, options=rpc.CHANNEL_OPTIONS)
            self.stubs = rpc.Stubs(channel)
            started = time.monotonic()
            try:
                self._session()
            except grpc.RpcError as exc:
                if self.stopping.is_set():
                    break
                message = _rpc_message(exc)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    message = tls.describe_rpc_error(exc, self.kit, self.address)
                log.warning("session with the server ended: %s", message)
            finally:
                self.connected.clear()
                channel.close()
            if time.monotonic() - started > 10:
                backoff = 0.5
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def _session(self) -> None:
        outq: queue.Queue[bytes | None] = queue.Queue()
        # first on the stream, before anything queued later
        outq.put(protocol.encode(SiteHello(self.incarnation, self.link.recv_seq)))
        self.link.attach(outq)
        heartbeat = protocol.encode(Heartbeat())

        def requests() -> Any:
            while True:
                try:
                    item = outq.get(timeout=5.0)
                except queue.Empty:
                    item = heartbeat
                if item is None:
                    return
                yield item

        assert self.stubs is not None
        responses = self.stubs.Session(requests())
        try:
            for raw in responses:
                msg, _ = protocol.decode(raw, *SERVER_MESSAGES)
                self._on_message(msg)
        finally:
            self.link.detach(outq)
            outq.put(None)
            responses.cancel()

    def stop(self) -> None:
        """Stop every job's script and end the session."""
        self.stopping.set()
        for job in list(self.jobs.values()):
            job.stop("site agent stopping")
        self.link.close()
        self.audit.sync(10)  # the trail's last records on disk before the process ends

    def send(self, msg: Numbered) -> None:
        """A reliable message to the server (sent now, or resent after a reconnect)."""
        self.link.send(msg)

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, Welcome):
            if msg.server_id != self.server_id:
                # A new server process: its numbering starts again, and what we had not
                # delivered refers to tasks of job processes that are gone.
                if self.server_id is not None:
                    log.info("the server restarted; resetting the session")
                self.link.reset(incoming=True, outgoing=self.server_id is not None)
                self.server_id = msg.server_id
            self.link.acked(msg.recv_seq)
            self.link.resend()
            self.connected.set()
            log.info("connected to the server as %s", self.kit.name)
            return
        if isinstance(msg, Ack):
            self.link.acked(msg.seq)
            return
        if not self.link.accept(msg.seq):
            return  # a resent duplicate: acknowledged again, not processed twice
        if isinstance(msg, Deploy):
            old = self.jobs.get(msg.job)
            if old is not None:
                old.stop("redeployed")
            job = SiteJob(self, msg)
            self.jobs[msg.job] = job
            threading.Thread(target=job.deploy, name=f"deploy-{msg.job}", daemon=True).start()
            return
        running = self.jobs.get(msg.job)
        if running is None:
            if isinstance(msg, SiteTask):
                error = "the job is not deployed at this site"
                self.send(TaskFailed(job=msg.job, task_id=msg.task_id, error=error))
            return
        if isinstance(msg, SiteTask):
            running.add_task(msg)
        elif isinstance(msg, CancelTask):
            running.cancel(msg.task_id)
        elif isinstance(msg, EndJob):
            running.stop(f"job {msg.status}")
            self.jobs.pop(msg.job, None)

    # ------------------------------------------------------------------ blobs

    def fetch(self, job_id: str, blob: BlobInfo, dest: Path, max_bytes: int) -> None:
        """Download a blob to ``dest``, checking size and hash against its announcement."""
        if blob.size > max_bytes:
            raise BundleError(
                f"{blob.id}: {blob.size} bytes is over this site's limit of {max_bytes}"
            )

        def once() -> None:
            stream = self._stubs().Fetch(protocol.encode(Fetch(job_id, blob.id)))
            rpc.receive_file(
                stream,
                dest,
                max_bytes=blob.size,
                expect_size=blob.size,
                expect_sha256=blob.sha256,
                reuse=True,  # a spare of dest's folder holds nothing anyone maps
            )

        self._transfer(f"download of {blob.id}", once)

    def push(self, job_id: str, task_id: str, path: Path, sha256: str | None = None) -> BlobInfo:
        """Upload a result file in one pass (hashed while read); returns its announcement.

        The server checks the hash in the stream's end frame against what it received.
        """
        size = path.stat().st_size

        def once() -> BlobInfo:
            frames_out = rpc.file_frames(path, Push(job_id, task_id, size), sha256=sha256)
            reply, _ = protocol.decode(self._stubs().Push(frames_out), Stored)
            return BlobInfo(reply.blob, size, reply.sha256)

        return self._transfer(f"upload of the result of {task_id}", once)

    def _transfer(self, what: str, once: Callable[[], T]) -> T:
        """Run a blob transfer; if the connection drops under it, again on the next session.

        A transfer is idempotent: a broken one leaves no file on either side, and the server
        keeps a task's result owed until the site announces it. Any other refusal is final.
        """
        import grpc

        for attempt in range(TRANSFER_ATTEMPTS):
            try:
                return once()
            except (grpc.RpcError, ValueError) as exc:
                dropped = _dropped(exc)
                if isinstance(exc, ValueError) and not dropped:
                    raise
                if not dropped or self.stopping.is_set() or attempt == TRANSFER_ATTEMPTS - 1:
                    raise FedctlError(f"{what} failed: {_rpc_message(exc)}") from None
                log.info("%s interrupted (%s); again once reconnected", what, _rpc_message(exc))
                self.stopping.wait(min(0.5 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def _stubs(self) -> rpc.Stubs:
        if not self.connected.wait(60) or self.stubs is None:
            raise FedctlError("not connected to the server")
        return self.stubs


def _dropped(exc: BaseException) -> bool:
    """Whether a call failed because its session's connection went away (worth doing again on the
    next session): cancelled or unavailable, or made on a channel the session loop had just
    closed (grpc raises ValueError for that: the session can end between ``_stubs()`` and the
    call)."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    return isinstance(exc, ValueError) and str(exc).startswith("Cannot invoke RPC")


def _rpc_message(exc: Any) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:
        return str(exc)


def serve(
    kit_dir: str | os.PathLike[str], workspace: str | None = None, address: str | None = None
) -> None:
    """Run a site agent from a kit until SIGTERM/SIGINT (what ``fedctl client start`` calls)."""
    # gRPC's C core logs every refused handshake at INFO on stderr; fedctl reports them itself.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fedctl.transport import tls

    kit = tls.load_kit(kit_dir)
    agent = SiteAgent(kit, workspace, address=address)
    pid_file = agent.ws / "agent.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    print(f"fedctl site {kit.name} connecting to {address or kit.server_address}", flush=True)
    try:
        agent.run()
    finally:
        agent.stop()
        pid_file.unlink(missing_ok=True)
