"""A job's life on the server: submitted, scheduled on sites, run in its own process, finished.

Jobs are stored in SQLite and scheduled once ``min_clients`` sites are connected (a job that
cannot be scheduled says why). Each runs its workflow in its own process
(``python -m fedctl.runtime.jobproc``), so several jobs run at once and a crashing job cannot take
the server down; the process talks to the server through :mod:`fedctl.runtime.joblink`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import drop_spares, enable_spares, remove_soon, sha256_file
from fedctl.codec import protocol
from fedctl.codec.protocol import BlobInfo, Deploy, EndJob, JobAbort, Submitter
from fedctl.constants import ENV_JOB_TOKEN
from fedctl.errors import FedctlError, PermissionDenied
from fedctl.jobs import (
    ABORTED,
    FAILED,
    FINISHED,
    RUNNING,
    SCHEDULED,
    SUBMITTED,
    TERMINAL,
    natural_key,
    new_job_id,
    user_round,
)
from fedctl.runtime import store as st
from fedctl.runtime.bundle import extract_bundle, make_bundle
from fedctl.runtime.procs import terminate_group
from fedctl.runtime.serverstate import RESUME_GRACE, JobRuntime, ServerState, SiteConn

if TYPE_CHECKING:
    from fedctl.provision.identity import Identity

log = logging.getLogger("fedctl.server")


class Scheduler:
    """Submits, schedules, launches, aborts and finishes jobs (see the module docstring)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.store = state.store

    # ------------------------------------------------------------------ submission

    def recover(self) -> None:
        """Jobs a previous server process left SCHEDULED or RUNNING are queued again; their job
        process resumes from the last checkpoint in their result folder."""
        for rec in self.store.list((RUNNING,)):
            self.store.transition(rec.id, SCHEDULED, "server restarted")
        for rec in self.store.list((SCHEDULED,)):
            self.store.transition(rec.id, SUBMITTED, "server restarted; waiting for sites")
            self.store.add_event(rec.id, "server_restarted", {})

    def submit(
        self, bundle: Path, ident: Identity, seed: int = 0, sha256: str | None = None
    ) -> st.JobRecord:
        """Store a submitted bundle as a new job (validated: safe paths, hashes, spec)."""
        from fedctl.recipe.jobfolder import load_job
        from fedctl.recipe.registry import server_code_refusal

        staging = bundle.parent / "job"
        extract_bundle(bundle, staging, max_bytes=self.state.config.max_bundle)
        # the kind must be built in or come from a plugin installed here (same message as the
        # simulator's); the arguments go through the recipe class
        recipe = load_job(staging, verify=False)
        reason = server_code_refusal(recipe)  # the message the simulator warns with
        if reason and not self.state.config.allow_server_code:
            self.state.audit.record(
                "access_denied", ident.name, action="server_code", reason=reason
            )
            raise PermissionDenied(reason)
        job_id = new_job_id(recipe.name)
        root = self.state.ws / "jobs" / job_id
        root.mkdir(parents=True)
        (root / "blobs").mkdir()
        enable_spares(root / "blobs")  # results and models are rewritten in place each round
        os.replace(staging, root / "job")
        os.replace(bundle, root / "bundle.zip")
        rec = st.JobRecord(
            id=job_id,
            name=recipe.name,
            kind=recipe.kind,
            submitter=ident.name,
            submitter_org=ident.org,
            state=SUBMITTED,
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
        self.state.audit.record(
            "job_submitted",
            ident.name,
            job=job_id,
            name=recipe.name,
            kind=recipe.kind,
            bundle_sha256=rec.bundle_sha256,
            bundle_size=rec.bundle_size,
        )
        self.store.add_event(job_id, "submitted", {"by": ident.name})
        self.state.wake.set()
        return rec

    def abort(self, job_id: str, reason: str) -> st.JobRecord:
        """Abort a job in any non-final state."""
        rec = self.store.get(job_id)
        if rec.state in TERMINAL:
            raise FedctlError(f"job {job_id} already {rec.state}")
        rt = self.state.job(job_id)
        if rt is None:
            rec = self.store.transition(job_id, ABORTED, reason)
            self.store.add_event(job_id, "run_finished", {"status": ABORTED, "reason": reason})
            return rec
        rt.abort_reason = reason
        self.state.audit.record("job_abort_requested", None, job=job_id, reason=reason)
        if rt.ipc is not None:
            with contextlib.suppress(OSError):
                protocol.send(rt.ipc, JobAbort(reason))
        deadline = time.time() + 15
        while time.time() < deadline and not rt.finished:
            time.sleep(0.05)
        if not rt.finished:
            if rt.proc is not None:
                terminate_group(rt.proc, 2)
            self.finish(rt, ABORTED, reason)
        return self.store.get(job_id)

    # ------------------------------------------------------------------ the scheduler loop

    def loop(self) -> None:
        """Check sites, job processes and the queue until the server stops."""
        state = self.state
        while not state.stopping.is_set():
            state.wake.wait(0.5)
            state.wake.clear()
            try:
                self._check_sites()
                self._check_processes()
                self._schedule()
            except Exception:
                log.exception("scheduler pass failed")

    def _online_sites(self) -> list[str]:
        return sorted(self.state.online(), key=natural_key)

    def _schedule(self) -> None:
        for rec in self.store.list((SUBMITTED,)):
            running = len(self.state.running())
            max_jobs = self.state.config.max_jobs
            if running >= max_jobs:
                limit = f"the server runs at most {max_jobs}"
                self._waiting(rec, f"waiting: {running} jobs running ({limit})")
                continue
            online = self._online_sites()
            if rec.sites:
                # A job interrupted by a server restart keeps its sites (and so each site's
                # index and data): wait for all of them, then go on with those that came back.
                missing = [s for s in rec.sites if s not in online]
                back = [s for s in rec.sites if s in online]
                waited = time.time() - self.state.started_at
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
        rec = self.store.transition(rec.id, SCHEDULED, None, sites=sites)
        rt = JobRuntime(rec, token=secrets.token_hex(16))
        site_bundle = rt.folder / "site-bundle.zip"
        if site_bundle.exists():  # a job resumed after a restart
            sha = sha256_file(site_bundle)
        else:
            sha = make_bundle(rec.job_dir, site_bundle, with_model=False)
        rt.site_bundle = BlobInfo("bundle", site_bundle.stat().st_size, sha)
        with self.state.lock:
            self.state.jobs[rec.id] = rt
        self.state.event(rt, "scheduled", {"sites": sites})
        self.state.audit.record("job_scheduled", None, job=rec.id, sites=sites)
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
            str(self.state.ipc_path),
        ]
        he_context = self.state.kit.he_context_path
        if he_context is not None and he_context.is_file():
            cmd += ["--he-context", str(he_context)]
        with open(rt.folder / "job.log", "ab") as out:
            rt.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        for name in sites:
            conn = self.state.site(name)
            if conn is not None:
                self.deploy_to(rt, conn)

    def deploy_to(self, rt: JobRuntime, conn: SiteConn) -> None:
        """Tell a site to deploy the job (again, after it restarted)."""
        sites = rt.rec.sites
        assert rt.site_bundle is not None  # set when the job was launched
        conn.link.send(
            Deploy(
                job=rt.rec.id,
                name=rt.rec.name,
                bundle=rt.site_bundle,
                site_index=sites.index(conn.name),
                num_sites=len(sites),
                seed=rt.rec.seed,
                mode=self.state.config.mode,
                submitter=Submitter(
                    rt.rec.submitter, rt.rec.submitter_org, rt.rec.extra.get("submitter_role")
                ),
            )
        )

    def _check_sites(self) -> None:
        now = time.time()
        timeout = self.state.config.site_timeout
        with self.state.lock:
            for conn in self.state.sites.values():
                if conn.online and now - conn.last_seen > timeout:
                    log.warning(
                        "site %s silent for %.0fs; dropping its stream",
                        conn.name,
                        now - conn.last_seen,
                    )
                    conn.link.close()

    def _check_processes(self) -> None:
        with self.state.lock:
            runtimes = list(self.state.jobs.values())
        for rt in runtimes:
            if rt.proc is None or rt.proc.poll() is None:  # poll() also reaps an ended one
                continue
            if rt.finished:
                rt.proc = None  # reaped: no zombie
                continue
            tail = _tail(rt.folder / "job.log")
            reason = rt.abort_reason or f"job process exited with code {rt.proc.returncode}"
            if tail and not rt.abort_reason:
                reason += f": {tail}"
            self.finish(rt, ABORTED if rt.abort_reason else FAILED, reason)

    def finish(self, rt: JobRuntime, state: str, reason: str | None) -> None:
        """The job ended: record it, tell its sites, close its process's connection."""
        with self.state.lock:
            if rt.finished:
                return
            rt.finished = True
        cur = self.store.get(rt.rec.id)
        if cur.state == SCHEDULED and state == FINISHED:
            self.store.transition(rt.rec.id, RUNNING)
        if cur.state not in TERMINAL:
            self.store.transition(rt.rec.id, state, reason)
        self.state.event(rt, "run_finished", {"status": state, "reason": reason})
        self.state.audit.record("job_finished", None, job=rt.rec.id, status=state, reason=reason)
        for name in rt.rec.sites:
            self.state.send_to_site(name, EndJob(job=rt.rec.id, status=state))
        if rt.ipc is not None:
            rt.ipc.close()
        _clear_blobs(rt.folder / "blobs")
        log.info("job %s %s%s", rt.rec.id, state, f": {reason}" if reason else "")
        self.state.wake.set()

    # ------------------------------------------------------------------ summaries

    def job_summary(self, rec: st.JobRecord, detail: bool = False) -> dict[str, Any]:
        """A job as admin commands show it (``detail``: with metrics, sites' progress, paths).

        ``round`` is 1-based, like everything users see (the round in progress, or the last one
        started), None before the first."""
        out: dict[str, Any] = {
            "job_id": rec.id,
            "name": rec.name,
            "kind": rec.kind,
            "status": rec.state,
            "reason": rec.reason,
            "submitter": rec.submitter,
            "submitted_at": rec.submitted_at,
            "round": user_round(rec.round),
            "num_rounds": rec.num_rounds,
            "sites": rec.sites,
        }
        if detail:
            rt = self.state.job(rec.id)
            with self.state.lock:
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

    def sites_summary(self) -> list[dict[str, Any]]:
        """Every site that connected since the server started, with the jobs it runs."""
        with self.state.lock:
            running = [rt for rt in self.state.jobs.values() if not rt.finished]
            return [
                {
                    "name": c.name,
                    "org": c.org,
                    "online": c.online,
                    "address": c.address,
                    "connected_at": c.connected_at,
                    "last_heartbeat": c.last_seen,
                    "jobs": sorted(rt.rec.id for rt in running if c.name in rt.rec.sites),
                }
                for c in sorted(self.state.sites.values(), key=lambda c: natural_key(c.name))
            ]


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[:500]


def _clear_blobs(folder: Path) -> None:
    """A job ended: its transfer files (models sent, results, spares) go; no site fetches them
    any more, and a job process still reading one keeps its own reference."""
    drop_spares(folder)
    with contextlib.suppress(FileNotFoundError):
        for path in folder.iterdir():
            if path.is_file():
                remove_soon(path)
