"""A job's own process: runs the workflow of one job for the server process that started it.

    python -m fedctl.runtime.jobproc --job-id ID --job-dir DIR --result-dir DIR --socket PATH

It loads the job folder (validated, nothing executed from it but the declared workflow),
connects back to the server over the unix socket (authenticated by a one-time token in its
environment), runs the workflow with a :class:`RuntimeCommunicator`, writes the run folder
(models, metrics, checkpoints after every round, result.json) and reports how it ended.
Exit code: 0 finished, 1 failed, 2 aborted.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedctl.constants import ENV_JOB_TOKEN
from fedctl.jobs import EXIT_CODES
from fedctl.recipe.jobfolder import load_job
from fedctl.recipe.runner import run_workflow
from fedctl.runtime.communicator import RuntimeCommunicator
from fedctl.tracking.run import finish_run
from fedctl.tracking.store import RunStore, jsonable
from fedctl.transport.frames import FrameSocket
from fedctl.workflows.base import WorkflowContext


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedctl-job")
    p.add_argument("--job-id", required=True)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--result-dir", required=True, type=Path)
    p.add_argument("--socket", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("fedctl.job")

    token = os.environ.pop(ENV_JOB_TOKEN, "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    ipc = FrameSocket(sock)
    ipc.send({"t": "hello", "job": args.job_id, "token": token})
    got = ipc.recv()
    if got is None or got[0]["t"] != "start":
        log.error("server refused the job process: %s", got[0] if got else "connection closed")
        return 1
    start = got[0]
    job = load_job(args.job_dir)
    store = RunStore(
        args.result_dir,
        key_metric=job.key_metric,
        key_metric_mode=job.key_metric_mode,
        checkpoint=True,
    )
    abort = threading.Event()
    comm = RuntimeCommunicator(
        ipc,
        args.job_id,
        start["sites"],
        args.job_dir.parent / "blobs",
        abort,
        on_records=store.add_records,
        offline_grace=float(start.get("offline_grace", 60.0)),
        on_late=store.log,
    )
    comm.start()

    def forward(event: dict[str, Any]) -> None:
        if event.get("traceback"):  # keep control messages small: the tail says where
            event = {**event, "traceback": event["traceback"][-8000:]}
        ipc.send({"t": "event", "event": jsonable(event)})

    ctx = WorkflowContext(
        comm,
        job_id=args.job_id,
        seed=int(start.get("seed", 0)),
        store=store,
        listeners=[store.listener, forward],
        abort=abort,
    )
    started = time.monotonic()
    store.log(f"job {args.job_id} ({job.name}) on sites {', '.join(start['sites'])}")
    status, reason = run_workflow(job, ctx)
    finish_run(
        store,
        job_id=args.job_id,
        name=job.name,
        mode="server",
        status=status,
        reason=reason,
        num_rounds=job.num_rounds,
        duration=time.monotonic() - started,
        extra={"sites": start["sites"], "seed": ctx.seed},
    )
    try:
        ipc.send({"t": "finished", "status": status, "reason": reason})
    except OSError:
        pass
    return EXIT_CODES[status]


if __name__ == "__main__":
    sys.exit(main())
