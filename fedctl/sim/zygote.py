"""The process backend's zygote and its workers (``python -m fedctl.sim.zygote FD DIR``).

The zygote imports torch and the simulator's worker once, then forks one worker per request
from the driver, so a worker starts in milliseconds and shares those modules' memory with its
siblings (copy-on-write) instead of importing them again. It is a process of its own, not the
driver forked: the driver has threads and may have run torch's thread pools, which a fork does
not survive, and nothing of the user's ``__main__`` is imported again (unlike multiprocessing's
spawn and forkserver).

Protocol. The control socket (inherited as FD) carries one byte per request with the worker's
end of a fresh socket pair attached (SCM_RIGHTS); the zygote answers with the worker's PID
(8 bytes). The zygote ends when the driver closes the control socket (or dies), and then removes
the run's transport folder (DIR) if the driver could not; it skips the interpreter's shutdown,
which the driver would otherwise wait for. A worker gets
``(WorkerConfig, transport directory)`` and then ``("batch", items, model_id, box)`` or
``("close",)`` messages, each a pickle between two processes of the same user on this machine:
nothing here comes from the network or from a job folder. A worker ends when its driver or
zygote does.
"""

from __future__ import annotations

import gc
import os

# pickle is safe here: what a worker unpickles comes only from its driver, over the socket pair
# the driver created and passed to this zygote (unnamed, unreachable from the network or by
# another process); see fedctl/sim/procs.py.
import pickle
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _watch_parent(zygote: int) -> None:
    """End this worker when its zygote is gone (the driver ended): a hung script must not
    keep a worker alive for ever."""

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != zygote:
                os._exit(1)

    threading.Thread(target=loop, name="fedctl-parent-watch", daemon=True).start()


def _send(conn: Connection, message: object) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def worker_main(fd: int, zygote: int) -> None:
    """One worker: build a WorkerCore, then run batches until told to close."""
    from fedctl.sim.procs import FileTransport
    from fedctl.sim.worker import WorkerCore

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # scripts may wait for their subprocesses
    conn = Connection(fd)
    _watch_parent(zygote)
    config, directory = pickle.loads(conn.recv_bytes())
    try:
        core = WorkerCore(config, FileTransport(directory))
    except BaseException as exc:
        _send(conn, ("error", f"{type(exc).__name__}: {exc}"))
        return
    _send(conn, ("ready", os.getpid()))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the driver is gone
        if message[0] == "close":
            try:
                core.close()
            finally:
                _send(conn, ("closed",))
            return
        _, items, model_id, box = message
        try:
            reply: tuple[object, ...] = ("ok", core.run_batch(items, model_id, box))
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            sys.stderr.write(traceback.format_exc())
            data = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
        conn.send_bytes(data)


def main(argv: list[str]) -> int:
    """Preload, then fork a worker for each request on the control socket."""
    control = socket.socket(fileno=int(argv[0]))
    try:
        return _serve(control)
    finally:
        shutil.rmtree(argv[1], ignore_errors=True)


def _serve(control: socket.socket) -> int:
    import torch  # noqa: F401  (the point of the zygote: imported once, shared by the workers)

    import fedctl.sim.procs
    import fedctl.sim.worker  # noqa: F401

    # What is imported by now (~170k objects with torch) lives as long as the workers do. Frozen,
    # it is out of their cyclic collections, which then neither walk it (a full collection in a
    # worker: 52 ms instead of 140, the rest being what a worker imports itself, such as torch's
    # _dynamo at a script's first optimizer) nor write to its objects' headers, so fewer of its
    # pages are copied into each worker (bench_sim case (b): 0.41 GiB at the peak, not 0.47).
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    me = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return 0
        if not msg or not fds:
            return 0  # the driver closed the control socket (or ended)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                control.close()
                worker_main(fds[0], me)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fds[0])
        control.sendall(struct.pack("!q", pid))


def _exit_now(code: int) -> None:
    """End without the interpreter's shutdown: with torch imported, tearing its modules down
    takes 0.4 s here, and every run's driver waits for this process to end. Nothing is lost:
    the transport folder is removed by then, no worker is ours to join, and the log is flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main(sys.argv[1:]))
