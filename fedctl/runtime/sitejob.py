"""One job at a site: its folder, its client script process, its queue of tasks.

The job's bundle is fetched, checked (hashes, size, safe paths) and unpacked; the site's own
``local/authorization.yaml`` decides whether it runs jobs from the submitter; the client script
runs as a subprocess in the job's ``work/`` folder and talks to this object over a private unix
socket (the SCRIPT messages of :mod:`fedctl.codec.protocol`). A script never outlives its
agent: it is started in its own process group with the kernel told to kill it when the agent
dies (Linux), and a new agent stops any script an earlier one left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import drop_spares, enable_spares, remove_soon, retire, safe_name
from fedctl.codec import protocol
from fedctl.codec.frames import FrameError, FrameSocket
from fedctl.codec.protocol import (
    BlobInfo,
    Deploy,
    Deployed,
    NextTask,
    Refused,
    ResultTaken,
    ScriptEnd,
    ScriptHello,
    ScriptInfo,
    ScriptRecords,
    ScriptResult,
    ScriptTask,
    SiteLog,
    SiteRecords,
    SiteResult,
    SiteTask,
    TaskFailed,
)
from fedctl.constants import ENV_AGENT_SOCKET, ENV_MODE, MAX_BLOB_BYTES, SCRIPT_ENV_DEFAULTS
from fedctl.errors import FedctlError
from fedctl.privacy.compression import job_chain
from fedctl.privacy.he import model as he_model
from fedctl.privacy.secagg import keys as secagg_keys
from fedctl.runtime.bundle import extract_bundle
from fedctl.runtime.lent import LentFiles
from fedctl.runtime.procs import terminate_group
from fedctl.runtime.sitesteps import ModelFileSteps
from fedctl.transport.local import listen_unix, socket_path
from fedctl.workflows import swarm_site

if TYPE_CHECKING:
    from fedctl.runtime.agent import SiteAgent

log = logging.getLogger("fedctl.agent")

LOG_BATCH = 200
SCRIPT_CONNECT_TIMEOUT = 300.0
#: the script's PID and start time, so a later agent can stop a script an earlier one left
SCRIPT_PID_FILE = "script.pid"


class SiteJob(ModelFileSteps):
    """One job at this site (see the module docstring)."""

    def __init__(self, agent: SiteAgent, deploy: Deploy) -> None:
        self.agent = agent
        self.job_id = deploy.job
        self.deploy_msg = deploy
        self.root = agent.ws / "jobs" / deploy.job
        self.tasks: queue.Queue[SiteTask | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = threading.Event()
        self.sock_path = socket_path(f"{agent.kit.name}-{secrets.token_hex(4)}")
        self.server_sock: socket.socket | None = None
        self.tail: deque[str] = deque(maxlen=200)
        self.log_lines: list[str] = []
        self.log_lock = threading.Lock()
        self.script_conn: FrameSocket | None = None
        self._he: Any = None  # the kit's secret HE context, once a task needs it
        #: task model files given to the script, kept until it no longer maps them
        self.lent = LentFiles()

    # ------------------------------------------------------------------ deployment

    def deploy(self) -> None:
        """Fetch, check and unpack the bundle, then start serving tasks; refusals are reported."""
        submitter = self.deploy_msg.submitter.name
        try:
            self._deploy()
        except (FedctlError, OSError) as exc:
            log.warning("job %s refused: %s", self.job_id, exc)
            self.agent.audit.record("job_refused", submitter, job=self.job_id, reason=str(exc))
            self.agent.send(Refused(job=self.job_id, reason=str(exc)))
            self.stopped.set()
            return
        self.agent.audit.record(
            "job_deployed",
            submitter,
            job=self.job_id,
            bundle_sha256=self.deploy_msg.bundle.sha256,
        )
        self.agent.send(Deployed(job=self.job_id))
        threading.Thread(target=self._serve_tasks, name=f"tasks-{self.job_id}", daemon=True).start()

    def _deploy(self) -> None:
        from fedctl.recipe.jobfolder import read_job_spec

        job_dir = self.root / "job"
        if not job_dir.exists():
            bundle = self.root / "bundle.zip"
            self.root.mkdir(parents=True, exist_ok=True)
            self.agent.fetch(self.job_id, self.deploy_msg.bundle, bundle, self.agent.max_bundle)
            try:
                extract_bundle(bundle, job_dir, max_bytes=self.agent.max_bundle, need_model=False)
            finally:
                bundle.unlink(missing_ok=True)
        self.recipe = read_job_spec(job_dir, need_model=False)
        self.check_policy()
        why = self.agent.privacy.check_job(
            self.recipe.spec["args"], self.deploy_msg.num_sites, self.recipe.spec.get("kind")
        )
        if why is not None:
            raise FedctlError(f"{self.agent.kit.name} refuses the job: {why}")
        # the job's filters, then the site's own: they run last, a job cannot undo them; the
        # job's compression decodes first and encodes last
        args = self.recipe.spec["args"]
        self.filters = job_chain(
            args.get("privacy"),
            args.get("compression"),
            secure=bool(args.get("secure_aggregation")),
            site=self.agent.privacy.filters,
        )
        (self.root / "work").mkdir(exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        enable_spares(self.root / "blobs")  # the script's result file is rewritten in place

    def check_policy(self) -> None:
        """Refuse the job unless this site's local/authorization.yaml lets its submitter's role
        submit jobs that bring their own code (every job carries its client script)."""
        from fedctl.provision.identity import Identity
        from fedctl.provision.policy import default_authorization, load_authorization

        path = self.agent.kit.local_dir / "authorization.yaml"
        policy = load_authorization(path) if path.exists() else default_authorization()
        sub = self.deploy_msg.submitter
        actor = Identity(sub.name, sub.org, "admin", sub.role)
        for right in ("submit", "byoc"):
            if not policy.allows(right, actor):
                raise FedctlError(
                    f"{self.agent.kit.name} does not run jobs from {actor.name} "
                    f"(role {actor.role}): '{right}' is not allowed by its local/authorization.yaml"
                )

    # ------------------------------------------------------------------ the script

    def _start_script(self) -> None:
        """Start the client script (it connects back on the job's socket)."""
        if self.server_sock is None:
            self.server_sock = listen_unix(self.sock_path, 1)
            self.server_sock.settimeout(1.0)
        self.lent.drop()  # what a script that ended still held
        d = self.deploy_msg
        script = self.root / "job" / "code" / self.recipe.train_script
        env = {
            **SCRIPT_ENV_DEFAULTS,
            **os.environ,
            ENV_MODE: d.mode,
            # the rest (site, index, seed, …) the script learns over this socket
            ENV_AGENT_SOCKET: str(self.sock_path),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, str(script), *shlex.split(self.recipe.train_args)]
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root / "work",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _record_script(self.root, self.proc.pid)
        threading.Thread(target=self._pump_output, args=(self.proc,), daemon=True).start()
        self.agent.audit.record(
            "script_started",
            None,
            job=self.job_id,
            pid=self.proc.pid,
            script=self.recipe.train_script,
        )
        self.script_conn = self._accept_script()
        hello = protocol.recv(self.script_conn, ScriptHello)
        if hello is None:
            raise _ScriptDied(*self._exit_reason())
        protocol.send(
            self.script_conn,
            ScriptInfo(
                site_name=self.agent.kit.name,
                site_index=d.site_index,
                num_sites=d.num_sites,
                job_id=self.job_id,
                seed=d.seed,
                mode=d.mode,
                workspace=str(self.root / "work"),
            ),
        )

    def _accept_script(self) -> FrameSocket:
        assert self.server_sock is not None and self.proc is not None
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
            return FrameSocket(conn)

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
            self.agent.send(SiteLog(job=self.job_id, lines=lines))

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

    def add_task(self, task: SiteTask) -> None:
        self.tasks.put(task)

    def cancel(self, task_id: str) -> None:
        self.cancelled.add(task_id)

    def _serve_tasks(self) -> None:
        while not self.stopped.is_set():
            task = self.tasks.get()
            if task is None:
                break
            if task.task_id in self.cancelled:
                continue
            try:
                self._run_task(task)
            except Exception as exc:
                error, tb = (str(exc), None)
                if isinstance(exc, _ScriptDied):
                    error, tb = exc.args[0], exc.args[1]
                if not self.stopped.is_set():
                    log.warning("job %s task %s failed: %s", self.job_id, task.task_id, error)
                    self._flush_log()
                    self.agent.send(
                        TaskFailed(job=self.job_id, task_id=task.task_id, error=error, traceback=tb)
                    )

    def _answer_secagg(self, task: SiteTask) -> None:
        """A secure-aggregation system task: answered here, the script is not involved."""
        meta = task.header.get("meta")
        msg = meta.get(secagg_keys.META) if isinstance(meta, dict) else None
        kind = msg.get("kind") if isinstance(msg, dict) else None
        self._answer_system(task, "secure_aggregation", kind, self._secagg().handle(meta))

    def _run_task(self, task: SiteTask) -> None:
        if task.name == secagg_keys.TASK:
            self._answer_secagg(task)
            return
        if task.name == swarm_site.TASK:
            self._answer_swarm(task)
            return
        task_id = task.task_id
        path = base_file = None
        he_strip = False
        task_header = task.header
        secagg_task = None
        meta = task_header.get("meta")
        he_keys = he_model.task_request(meta if isinstance(meta, dict) else None)
        if he_keys is not None:
            task_header = {**task_header, "meta": he_model.strip_request(meta)}
        if isinstance(meta, dict) and secagg_keys.wants_input(meta):
            secagg_task = {k: meta[k] for k in secagg_keys.PRIVATE_META if k in meta}
            task_header = {**task_header, "meta": secagg_keys.strip_private(meta)}
        swarm_spec = (
            meta[swarm_site.META] if isinstance(meta, dict) and swarm_site.is_train(meta) else None
        )
        if task.blob is not None:
            path = self.root / "blobs" / f"task.{safe_name(task_id)}.safetensors"
            self.agent.fetch(self.job_id, task.blob, path, MAX_BLOB_BYTES)
            self.agent.audit.record(
                "model_received",
                None,
                job=self.job_id,
                task=task_id,
                round=task.header.get("current_round"),
                sha256=task.blob.sha256,
                size=task.blob.size,
            )
            if self.recipe.spec["args"].get("homomorphic_encryption") is not None:
                # only an HE job's models can be encrypted: other jobs skip reading the header
                task_header, encrypted = self._he_open_file(path, task_header)
                he_strip = encrypted and he_keys is None
            if swarm_spec is not None:  # the model sealed for this site, opened
                task_header = self._swarm_open_file(path, task_header, swarm_spec)
            if self.filters.at("task_in"):
                task_header = self._filter_file(path, task_header, "task_in", task, None)[0]
            if self.filters.at("result_out") or secagg_task is not None or he_keys is not None:
                # the model the script starts from, kept for its update (the script removes
                # its own link to the file once it has read it)
                base_file = path.with_suffix(".base")
                _link_or_copy(path, base_file)
        try:
            self._run_script_task(
                task, task_header, path, base_file, secagg_task, he_keys, he_strip, swarm_spec
            )
        except BaseException:
            if secagg_task is not None:  # this site drops out of the round
                self._secagg().forget_task(secagg_task)
            raise

    def _run_script_task(
        self,
        task: SiteTask,
        task_header: dict[str, Any],
        path: Path | None,
        base_file: Path | None,
        secagg_task: dict[str, Any] | None,
        he_keys: list[str] | None = None,
        he_strip: bool = False,
        swarm_spec: dict[str, Any] | None = None,
    ) -> None:
        """Give the task to the client script, filter (and mask or encrypt) its result, send
        it."""
        task_id = task.task_id
        if self.proc is None or self.proc.poll() is not None:
            self.script_conn = None
            self._start_script()
        assert self.script_conn is not None
        conn = self.script_conn
        asked = self._recv_script(conn, NextTask)  # the script asks for its next task: this one
        self.lent.returned(asked.released, asked.dropped)
        if path is not None:
            self.lent.lend(path)
        protocol.send(
            conn,
            ScriptTask(
                task_id=task_id,
                name=task.name,
                header=task_header,
                result_dir=str(self.root / "blobs"),
                path=str(path) if path else None,
            ),
        )
        result = self._recv_script(conn, ScriptResult)
        try:
            header, blob = self._send_result(
                task, task_header, result, base_file, secagg_task, he_keys, he_strip, swarm_spec
            )
        finally:
            # only now: the result's filters may still have read the model file's base link
            self.lent.returned(result.released, result.dropped)
        protocol.send(conn, ResultTaken())
        self._flush_log()
        if task_id in self.cancelled:
            return
        self.agent.send(SiteResult(job=self.job_id, task_id=task_id, header=header, blob=blob))

    def _send_result(
        self,
        task: SiteTask,
        task_header: dict[str, Any],
        result: ScriptResult,
        base_file: Path | None,
        secagg_task: dict[str, Any] | None,
        he_keys: list[str] | None,
        he_strip: bool,
        swarm_spec: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], BlobInfo | None]:
        """Filter (and mask or encrypt) the script's result and upload it: (header, blob)."""
        task_id = task.task_id
        blob = None
        header, filtered = result.header, list[str]()
        result_path = Path(result.path) if result.path else None
        if result_path and self.root / "blobs" not in result_path.resolve().parents:
            raise FrameError("script wrote its result outside the job's folder")
        if result_path and he_strip:  # an HE job's evaluation: no plain model leaves
            header = self._he_strip_file(result_path, result.header)
        elif result_path:
            sha = result.sha256
            try:
                if self.filters.at("result_out"):
                    header, sha, filtered = self._filter_file(
                        result_path, result.header, "result_out", task, base_file
                    )
                if he_keys is not None:
                    header, sha = self._he_seal_file(
                        result_path, header, he_keys, task_header, base_file
                    )
                    filtered = [*filtered, "homomorphic_encryption"]
                if secagg_task is not None:
                    header, sha = self._mask_file(
                        result_path, header, secagg_task, task_header, base_file
                    )
                    filtered = [*filtered, "secure_aggregation"]
                if swarm_spec is not None:
                    header, sha = self._swarm_seal_file(result_path, header, swarm_spec)
                    filtered = [*filtered, "swarm_sealed"]
            finally:
                if base_file is not None:
                    remove_soon(base_file)
            blob = self.agent.push(self.job_id, task_id, result_path, sha)
            retire(result_path)  # nothing maps it: the script's next result overwrites it
            self.agent.audit.record(
                "model_sent",
                None,
                job=self.job_id,
                task=task_id,
                round=result.header.get("current_round"),
                sha256=blob.sha256,
                size=blob.size,
                filters=filtered or None,
            )
        return header, blob

    def _recv_script(self, conn: FrameSocket, want: type[Any]) -> Any:
        """The script's next message of kind ``want``, relaying its records meanwhile."""
        while True:
            try:
                msg = protocol.recv(conn, want, ScriptRecords)
            except (OSError, FrameError) as exc:
                msg = None
                log.warning("job %s: bad message from the script: %s", self.job_id, exc)
            if msg is None:
                if self.proc is not None:
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        terminate_group(self.proc)
                time.sleep(0.2)  # let the output pump catch the last lines
                raise _ScriptDied(*self._exit_reason())
            if isinstance(msg, ScriptRecords):
                if msg.records:
                    self.agent.send(SiteRecords(job=self.job_id, records=msg.records))
                continue
            return msg

    def stop(self, reason: str) -> None:
        """End the job here: tell the script, then make sure its process group is gone."""
        self.stopped.set()
        self.tasks.put(None)
        conn, proc = self.script_conn, self.proc
        if conn is not None:
            with contextlib.suppress(OSError, FrameError):
                protocol.send(conn, ScriptEnd(reason))
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
        (self.root / SCRIPT_PID_FILE).unlink(missing_ok=True)
        self.lent.drop()
        drop_spares(self.root / "blobs")
        shutil.rmtree(self.root / "secagg", ignore_errors=True)  # secrets of unfinished rounds


class _ScriptDied(Exception):
    """The client script ended while a task was outstanding (args: error, traceback)."""


# ---------------------------------------------------------------------- no orphaned scripts

#: Run first in the script's process (Linux): ask the kernel for SIGKILL when the agent's thread
#: that started it dies, however the agent dies; leave at once if the agent is already gone; then
#: become the script (``execv``: the same PID, the setting kept). Not a ``preexec_fn``: Python
#: code between fork and exec in a process running gRPC can die with gRPC's poller on closed
#: descriptors ("epoll_wait error: Bad file descriptor", SIGABRT), seen once in the test suite.
#: Elsewhere the next agent's :func:`stop_leftover_scripts` stops leftover scripts.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where links are not possible)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _record_script(job_root: Path, pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        started = psutil.Process(pid).create_time()
        (job_root / SCRIPT_PID_FILE).write_text(json.dumps({"pid": pid, "started": started}))


def stop_leftover_scripts(workspace: Path) -> list[int]:
    """Stop client scripts an earlier agent process of this site left running (checked by PID
    and start time, so an unrelated process that reused the PID is left alone)."""
    import psutil

    stopped = []
    for pid_file in workspace.glob(f"jobs/*/{SCRIPT_PID_FILE}"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, psutil.Error):
            info = json.loads(pid_file.read_text())
            proc = psutil.Process(int(info["pid"]))
            if abs(proc.create_time() - float(info["started"])) < 0.01:
                terminate_group(proc.pid, 2.0)
                stopped.append(proc.pid)
        pid_file.unlink(missing_ok=True)
    return stopped
