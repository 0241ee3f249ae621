"""A job's own process: runs the workflow of one job for the server process that started it.

    python -m fedctl.runtime.jobproc --job-id ID --job-dir DIR --result-dir DIR --socket PATH

It loads the job folder (validated, nothing executed from it but the declared workflow),
connects back to the server over the unix socket (authenticated by a one-time token in its
environment), runs the workflow with a :class:`RuntimeCommunicator`, writes the run folder
(models, metrics, checkpoints after every round, result.json) and reports how it ended.

Exit code: 0 finished, 1 failed, 2 aborted, 3 the server went away (the run is not finished:
it resumes from its last checkpoint when the server comes back).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedctl.codec import protocol
from fedctl.codec.frames import FrameSocket
from fedctl.codec.protocol import Finished, JobAbort, JobHello, JobRefused, JobStart, WorkflowEvent
from fedctl.constants import ENV_JOB_TOKEN
from fedctl.jobs import EXIT_CODES
from fedctl.privacy.compression import job_chain
from fedctl.recipe.jobfolder import load_job
from fedctl.recipe.runner import run_workflow
from fedctl.runtime.communicator import RuntimeCommunicator, ServerLost
from fedctl.tracking.run import finish_run
from fedctl.tracking.store import RunStore, jsonable
from fedctl.workflows.base import WorkflowContext

#: exit code when the server process went away before the job ended
SERVER_LOST = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedctl-job")
    p.add_argument("--job-id", required=True)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--result-dir", required=True, type=Path)
    p.add_argument("--socket", required=True)
    p.add_argument("--he-context", type=Path, default=None, help="the server kit's public context")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("fedctl.job")

    token = os.environ.pop(ENV_JOB_TOKEN, "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    ipc = FrameSocket(sock)
    protocol.send(ipc, JobHello(args.job_id, token))
    start = protocol.recv(ipc, JobStart, JobRefused, JobAbort)
    if not isinstance(start, JobStart):
        log.error("server refused the job process: %s", start or "connection closed")
        return 1
    job = load_job(args.job_dir)
    store = RunStore(
        args.result_dir,
        key_metric=job.key_metric,
        key_metric_mode=job.key_metric_mode,
        checkpoint=True,
    )
    store.start_tracking(
        job.tracking,
        job_id=args.job_id,
        name=job.name,
        kind=job.kind,
        args=job.to_spec(),
        mode="server",
    )
    abort = threading.Event()
    comm = RuntimeCommunicator(
        ipc,
        args.job_id,
        start.sites,
        args.job_dir.parent / "blobs",
        abort,
        on_records=store.add_records,
        offline_grace=start.offline_grace,
        on_late=store.log,
    )
    comm.start()

    def forward(event: dict[str, Any]) -> None:
        if comm.server_lost:
            return
        if event.get("traceback"):  # keep control messages small: the tail says where
            event = {**event, "traceback": event["traceback"][-8000:]}
        comm.post(WorkflowEvent(jsonable(event)))

    ctx = WorkflowContext(
        comm,
        job_id=args.job_id,
        seed=start.seed,
        store=store,
        listeners=[store.listener, forward],
        abort=abort,
        filters=job_chain(job.privacy, job.compression, secure=job.secure_aggregation is not None),
        secret_randomness=True,  # a real server's noise must not be predictable from the seed
        he_public=args.he_context.read_bytes() if args.he_context else None,
    )
    started = time.monotonic()
    store.log(f"job {args.job_id} ({job.name}) on sites {', '.join(start.sites)}")
    status, reason = run_workflow(job, ctx)
    if comm.server_lost:
        # Not an outcome: the server was stopped or killed. Its next process queues the job
        # again and this run resumes from its last checkpoint.
        store.log("lost the server process; the job resumes from its last checkpoint")
        store.close()
        return SERVER_LOST
    finish_run(
        store,
        job_id=args.job_id,
        name=job.name,
        mode="server",
        status=status,
        reason=reason,
        num_rounds=job.num_rounds,
        duration=time.monotonic() - started,
        extra={"sites": start.sites, "seed": ctx.seed},
    )
    with contextlib.suppress(ServerLost):
        comm.post(Finished(status, reason))
    return EXIT_CODES[status]


if __name__ == "__main__":
    sys.exit(main())
