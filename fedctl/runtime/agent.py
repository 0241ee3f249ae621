"""The site agent: ``fedctl client start --kit DIR``.

It keeps a mutual-TLS session with the server (reconnecting with backoff), and for each job the
server deploys here it fetches the bundle (hash- and size-checked, unpacked safely), runs the
job's client script as a subprocess in the job's folder, hands it tasks and relays its results,
logs and metrics. Control messages are numbered and acknowledged in both directions, so a
reconnect neither loses nor repeats one; each result is uploaded as a file in chunks before it
is announced.

Site folder (``<kit>/workspace`` by default)::

    jobs/<job>/job/       the unpacked job (code, initial model, spec)
    jobs/<job>/work/      the script's working directory (its state, its files)
    jobs/<job>/blobs/     task models received, results to upload
    jobs/<job>/client.log the script's output
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import safe_name
from fedctl.constants import ENV_AGENT_SOCKET, ENV_MODE, MAX_BLOB_BYTES, MAX_BUNDLE_BYTES
from fedctl.errors import FedctlError
from fedctl.runtime.audit import AuditLog
from fedctl.runtime.bundle import BundleError, extract_bundle
from fedctl.runtime.procs import terminate_group
from fedctl.transport import frames, rpc
from fedctl.transport.frames import FrameError, FrameSocket
from fedctl.transport.reliable import ReliableLink

if TYPE_CHECKING:
    from fedctl.provision.kit import Kit

log = logging.getLogger("fedctl.agent")

LOG_BATCH = 200
SCRIPT_CONNECT_TIMEOUT = 300.0


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
        self.audit = AuditLog(self.ws / "audit.jsonl", kit.name)
        self.max_bundle = max_bundle
        self.incarnation = secrets.token_hex(8)
        self.server_id: str | None = None
        self.link = ReliableLink()
        self.jobs: dict[str, SiteJob] = {}
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.stubs: rpc.Stubs | None = None

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
        hello = {"t": "hello", "incarnation": self.incarnation, "recv_seq": self.link.recv_seq}
        outq.put(frames.encode(hello))  # first on the stream, before anything queued later
        self.link.attach(outq)

        def requests() -> Any:
            while True:
                try:
                    item = outq.get(timeout=5.0)
                except queue.Empty:
                    item = frames.encode({"t": "heartbeat"})
                if item is None:
                    return
                yield item

        assert self.stubs is not None
        responses = self.stubs.Session(requests())
        try:
            for raw in responses:
                header, _ = frames.decode(raw)
                self._on_message(header)
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

    def send(self, header: dict[str, Any]) -> None:
        """A reliable message to the server (sent now, or resent after a reconnect)."""
        self.link.send(header)

    def _on_message(self, h: dict[str, Any]) -> None:
        kind = h["t"]
        if kind == "heartbeat":
            return
        if kind == "welcome":
            server_id = frames.field(h, "server_id", str)
            if server_id != self.server_id:
                # A new server process: its numbering starts again, and what we had not
                # delivered refers to tasks of job processes that are gone.
                if self.server_id is not None:
                    log.info("the server restarted; resetting the session")
                self.link.reset(incoming=True, outgoing=self.server_id is not None)
                self.server_id = server_id
            self.link.acked(frames.field(h, "recv_seq", int))
            self.link.resend()
            self.connected.set()
            log.info("connected to the server as %s", self.kit.name)
            return
        if kind == "ack":
            self.link.acked(frames.field(h, "seq", int))
            return
        if not self.link.accept(frames.field(h, "seq", int)):
            return  # a resent duplicate: acknowledged again, not processed twice
        job_id = frames.field(h, "job", str)
        if kind == "deploy":
            old = self.jobs.get(job_id)
            if old is not None:
                old.stop("redeployed")
            job = SiteJob(self, job_id, h)
            self.jobs[job_id] = job
            threading.Thread(target=job.deploy, name=f"deploy-{job_id}", daemon=True).start()
        elif kind in ("task", "cancel", "end_job"):
            job = self.jobs.get(job_id)
            if job is None:
                if kind == "task":
                    self.send(
                        {
                            "t": "task_failed",
                            "job": job_id,
                            "task_id": h.get("task_id"),
                            "error": "the job is not deployed at this site",
                        }
                    )
                return
            if kind == "task":
                job.add_task(h)
            elif kind == "cancel":
                job.cancel(str(h.get("task_id")))
            else:
                job.stop(f"job {h.get('status', 'ended')}")
                self.jobs.pop(job_id, None)
        else:
            raise FrameError(f"unexpected message type {kind!r}")

    # ------------------------------------------------------------------ blobs

    def fetch(self, job_id: str, blob: dict[str, Any], dest: Path, max_bytes: int) -> None:
        """Download a blob to ``dest``, checking size and hash against its announcement."""
        size = frames.field(blob, "size", int)
        if size > max_bytes:
            raise BundleError(
                f"{blob.get('id')}: {size} bytes is over this site's limit of {max_bytes}"
            )
        stubs = self._stubs()
        stream = stubs.Fetch(frames.encode({"t": "fetch", "job": job_id, "blob": blob["id"]}))
        rpc.receive_file(
            stream,
            dest,
            max_bytes=size,
            expect_size=size,
            expect_sha256=frames.field(blob, "sha256", str),
        )

    def push(
        self, job_id: str, task_id: str, path: Path, sha256: str | None = None
    ) -> dict[str, Any]:
        """Upload a result file in one pass (hashed while read); returns its announcement.

        The server checks the hash in the stream's end frame against what it received.
        """
        size = path.stat().st_size
        first = {"t": "push", "job": job_id, "task_id": task_id, "size": size}
        frames_out = rpc.file_frames(path, first, sha256=sha256)
        reply, _ = frames.decode(self._stubs().Push(frames_out), {"ok"})
        return {"id": reply["blob"], "size": size, "sha256": frames.field(reply, "sha256", str)}

    def _stubs(self) -> rpc.Stubs:
        if not self.connected.wait(60) or self.stubs is None:
            raise FedctlError("not connected to the server")
        return self.stubs


class SiteJob:
    """One job at this site: its folder, its script process, its queue of tasks."""

    def __init__(self, agent: SiteAgent, job_id: str, deploy: dict[str, Any]) -> None:
        self.agent = agent
        self.job_id = job_id
        self.deploy_msg = deploy
        self.root = agent.ws / "jobs" / job_id
        self.tasks: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = threading.Event()
        self.sock_path = frames.socket_path(f"{agent.kit.name}-{secrets.token_hex(4)}")
        self.server_sock: socket.socket | None = None
        self.tail: deque[str] = deque(maxlen=200)
        self.log_lines: list[str] = []
        self.log_lock = threading.Lock()
        self.script_conn: FrameSocket | None = None

    # ------------------------------------------------------------------ deployment

    def deploy(self) -> None:
        """Fetch, check and unpack the bundle, then start serving tasks; refusals are reported."""
        try:
            self._deploy()
        except (FedctlError, OSError) as exc:
            log.warning("job %s refused: %s", self.job_id, exc)
            self.agent.audit.record(
                "job_refused", self.submitter.get("name"), job=self.job_id, reason=str(exc)
            )
            self.agent.send({"t": "refused", "job": self.job_id, "reason": str(exc)})
            self.stopped.set()
            return
        self.agent.audit.record(
            "job_deployed",
            self.submitter.get("name"),
            job=self.job_id,
            bundle_sha256=self.deploy_msg["bundle"].get("sha256"),
        )
        self.agent.send({"t": "deployed", "job": self.job_id})
        threading.Thread(target=self._serve_tasks, name=f"tasks-{self.job_id}", daemon=True).start()

    def _deploy(self) -> None:
        from fedctl.recipe.jobfolder import read_job_spec

        job_dir = self.root / "job"
        if not job_dir.exists():
            bundle = self.root / "bundle.zip"
            self.root.mkdir(parents=True, exist_ok=True)
            self.agent.fetch(
                self.job_id,
                frames.field(self.deploy_msg, "bundle", dict),
                bundle,
                self.agent.max_bundle,
            )
            try:
                extract_bundle(bundle, job_dir, max_bytes=self.agent.max_bundle, need_model=False)
            finally:
                bundle.unlink(missing_ok=True)
        self.recipe = read_job_spec(job_dir, need_model=False)
        self.check_policy()
        (self.root / "work").mkdir(exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)

    @property
    def submitter(self) -> dict[str, Any]:
        sub = self.deploy_msg.get("submitter")
        return sub if isinstance(sub, dict) else {}

    def check_policy(self) -> None:
        """Refuse the job unless this site's local/authorization.yaml lets its submitter's role
        submit jobs that bring their own code (every job carries its client script)."""
        from fedctl.provision.identity import Identity
        from fedctl.provision.policy import default_authorization, load_authorization

        path = self.agent.kit.local_dir / "authorization.yaml"
        policy = load_authorization(path) if path.exists() else default_authorization()
        sub = self.submitter
        actor = Identity(str(sub.get("name")), str(sub.get("org")), "admin", sub.get("role"))
        for right in ("submit", "byoc"):
            if not policy.allows(right, actor):
                raise FedctlError(
                    f"{self.agent.kit.name} does not run jobs from {actor.name} "
                    f"(role {actor.role}): '{right}' is not allowed by its local/authorization.yaml"
                )

    # ------------------------------------------------------------------ the script

    def _listen(self) -> None:
        self.server_sock = frames.listen_unix(self.sock_path, 1)
        self.server_sock.settimeout(1.0)

    def _start_script(self) -> None:
        """Start the client script (it connects back on the job's socket)."""
        if self.server_sock is None:
            self._listen()
        d = self.deploy_msg
        code = self.root / "job" / "code"
        script = code / self.recipe.train_script
        env = {
            **os.environ,
            ENV_MODE: str(d.get("mode", "production")),
            # the rest (site, index, seed, …) the script learns over this socket
            ENV_AGENT_SOCKET: str(self.sock_path),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, str(script), *shlex.split(self.recipe.train_args)]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root / "work",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._pump_output, args=(self.proc,), daemon=True).start()
        self.agent.audit.record(
            "script_started",
            None,
            job=self.job_id,
            pid=self.proc.pid,
            script=self.recipe.train_script,
        )
        assert self.server_sock is not None
        deadline = time.monotonic() + SCRIPT_CONNECT_TIMEOUT
        while True:
            try:
                conn, _ = self.server_sock.accept()
            except TimeoutError:
                if self.proc.poll() is not None:
                    time.sleep(0.2)  # let the output pump catch the last lines
                    raise _ScriptDied(*self._exit_reason()) from None
                if time.monotonic() > deadline:
                    terminate_group(self.proc)
                    raise _ScriptDied(
                        f"the script did not call fedctl.client.init() within "
                        f"{SCRIPT_CONNECT_TIMEOUT:.0f}s",
                        None,
                    ) from None
                continue
            conn.settimeout(None)
            self.script_conn = FrameSocket(conn)
            break
        got = self.script_conn.recv({"hello"})
        if got is None:
            raise _ScriptDied(*self._exit_reason())
        self.script_conn.send(
            {
                "t": "info",
                "site_name": self.agent.kit.name,
                "site_index": d.get("site_index", 0),
                "num_sites": d.get("num_sites", 1),
                "job_id": self.job_id,
                "seed": d.get("seed", 0),
                "mode": d.get("mode", "production"),
                "workspace": str(self.root / "work"),
            }
        )

    def _pump_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.root / "client.log", "ab") as logf:
            for raw in proc.stdout:
                logf.write(raw)
                logf.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                self.tail.append(line)
                with self.log_lock:
                    self.log_lines.append(line)
                    flush = len(self.log_lines) >= LOG_BATCH
                if flush:
                    self._flush_log()
        self._flush_log()

    def _flush_log(self) -> None:
        with self.log_lock:
            lines, self.log_lines = self.log_lines, []
        if lines:
            self.agent.send({"t": "log", "job": self.job_id, "lines": lines})

    def _exit_reason(self) -> tuple[str, str | None]:
        code = self.proc.poll() if self.proc else None
        lines = list(self.tail)
        tb_start = max(
            (i for i, line in enumerate(lines) if line.startswith("Traceback")), default=None
        )
        if tb_start is not None:
            tb = "\n".join(lines[tb_start:])
            last = next((line for line in reversed(lines) if line.strip()), "")
            return last.strip() or f"script exited with code {code}", tb
        return f"script exited with code {code}", None

    # ------------------------------------------------------------------ tasks

    def add_task(self, h: dict[str, Any]) -> None:
        self.tasks.put(h)

    def cancel(self, task_id: str) -> None:
        self.cancelled.add(task_id)

    def _serve_tasks(self) -> None:
        while not self.stopped.is_set():
            task = self.tasks.get()
            if task is None:
                break
            task_id = str(task.get("task_id"))
            if task_id in self.cancelled:
                continue
            try:
                self._run_task(task)
            except Exception as exc:
                error, tb = (str(exc), None)
                if isinstance(exc, _ScriptDied):
                    error, tb = exc.args[0], exc.args[1]
                if not self.stopped.is_set():
                    log.warning("job %s task %s failed: %s", self.job_id, task_id, error)
                    self._flush_log()
                    self.agent.send(
                        {
                            "t": "task_failed",
                            "job": self.job_id,
                            "task_id": task_id,
                            "error": error,
                            "traceback": tb,
                        }
                    )

    def _run_task(self, task: dict[str, Any]) -> None:
        task_id = str(task["task_id"])
        path = None
        if task.get("blob"):
            path = self.root / "blobs" / f"task.{safe_name(task_id)}.safetensors"
            self.agent.fetch(self.job_id, task["blob"], path, MAX_BLOB_BYTES)
            self.agent.audit.record(
                "model_received",
                None,
                job=self.job_id,
                task=task_id,
                round=(task.get("header") or {}).get("current_round"),
                sha256=task["blob"].get("sha256"),
                size=task["blob"].get("size"),
            )
        if self.proc is None or self.proc.poll() is not None:
            self.script_conn = None
            self._start_script()
        assert self.script_conn is not None
        conn = self.script_conn
        # the script asks for its next task; answer with this one
        msg = self._recv_script(conn)
        while msg["t"] == "records":
            self._records(msg)
            msg = self._recv_script(conn)
        if msg["t"] != "next":
            raise FrameError(f"script sent {msg['t']!r} while waiting for a task")
        conn.send(
            {
                "t": "task",
                "task_id": task_id,
                "name": task.get("name"),
                "header": task.get("header"),
                "path": str(path) if path else None,
                "result_dir": str(self.root / "blobs"),
            }
        )
        while True:
            msg = self._recv_script(conn)
            if msg["t"] == "records":
                self._records(msg)
                continue
            if msg["t"] != "result":
                raise FrameError(f"script sent {msg['t']!r} instead of a result")
            break
        if path is not None:
            path.unlink(missing_ok=True)
        header = frames.field(msg, "header", dict)
        result_path = msg.get("path")
        blob = None
        if result_path:
            result = Path(result_path)
            if self.root / "blobs" not in result.resolve().parents:
                raise FrameError("script wrote its result outside the job's folder")
            claimed = msg.get("sha256") if isinstance(msg.get("sha256"), str) else None
            blob = self.agent.push(self.job_id, task_id, result, claimed)
            result.unlink(missing_ok=True)
            self.agent.audit.record(
                "model_sent",
                None,
                job=self.job_id,
                task=task_id,
                round=header.get("current_round"),
                sha256=blob["sha256"],
                size=blob["size"],
            )
        conn.send({"t": "ok"})
        self._flush_log()
        if task_id in self.cancelled:
            return
        self.agent.send(
            {"t": "result", "job": self.job_id, "task_id": task_id, "header": header, "blob": blob}
        )

    def _recv_script(self, conn: FrameSocket) -> dict[str, Any]:
        try:
            got = conn.recv({"next", "result", "records"})
        except (OSError, FrameError) as exc:
            got = None
            log.warning("job %s: bad message from the script: %s", self.job_id, exc)
        if got is None:
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    terminate_group(self.proc)
            time.sleep(0.2)  # let the output pump catch the last lines
            raise _ScriptDied(*self._exit_reason())
        return got[0]

    def _records(self, msg: dict[str, Any]) -> None:
        records = msg.get("records")
        if isinstance(records, list) and records:
            self.agent.send({"t": "records", "job": self.job_id, "records": records})

    def stop(self, reason: str) -> None:
        """End the job here: tell the script, then make sure its process group is gone."""
        self.stopped.set()
        self.tasks.put(None)
        conn, proc = self.script_conn, self.proc
        if conn is not None:
            with contextlib.suppress(OSError, FrameError):
                conn.send({"t": "end", "reason": reason})
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                terminate_group(proc)
        if conn is not None:
            conn.close()
        if self.server_sock is not None:
            self.server_sock.close()
            self.sock_path.unlink(missing_ok=True)


class _ScriptDied(Exception):
    """The client script ended while a task was outstanding (args: error, traceback)."""


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
