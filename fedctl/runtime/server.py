"""The fedctl server: sites, jobs and admins over one mutual-TLS gRPC port.

The server is wired from parts that each own one job:

* :mod:`~fedctl.runtime.sessions` — sites' ``Session`` streams and their blob transfers;
* :mod:`~fedctl.runtime.adminapi` — the admin API, checked by :mod:`~fedctl.runtime.authz`;
* :mod:`~fedctl.runtime.scheduler` — a job's life: submitted, scheduled, launched, finished;
* :mod:`~fedctl.runtime.joblink` — the link to each job's own process;
* :mod:`~fedctl.runtime.serverstate` — what they share.

This module starts and stops them and routes the gRPC methods to them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING, Any

from fedctl.errors import FedctlError
from fedctl.runtime.adminapi import AdminApi
from fedctl.runtime.authz import Authorizer
from fedctl.runtime.joblink import JobLink
from fedctl.runtime.procs import terminate_group
from fedctl.runtime.scheduler import Scheduler
from fedctl.runtime.serverstate import ServerConfig, ServerState, SiteConn
from fedctl.runtime.sessions import SiteSessions
from fedctl.transport import rpc

if TYPE_CHECKING:
    import grpc

    from fedctl.provision.kit import Kit

log = logging.getLogger("fedctl.server")


class Server:
    """A server process: its state, its parts, and the gRPC service they implement."""

    def __init__(
        self, kit: Kit, workspace: str | os.PathLike[str] | None = None, **config: Any
    ) -> None:
        if kit.type != "server":
            raise FedctlError(
                f"{kit.root} is a {kit.type} kit; `fedctl server start` needs the server kit"
            )
        self.state = ServerState(kit, workspace, ServerConfig(**config))
        self.authz = Authorizer(self.state)
        self.scheduler = Scheduler(self.state)
        self.link = JobLink(self.state, self.scheduler)
        self.sessions = SiteSessions(self.state, self.scheduler, self.link)
        self.admin = AdminApi(self.state, self.scheduler, self.authz)
        # the gRPC methods (rpc.generic_handler looks them up by name)
        self.Session = self.sessions.Session
        self.Fetch = self.sessions.Fetch
        self.Push = self.sessions.Push
        self.Admin = self.admin.Admin
        self.AdminUpload = self.admin.AdminUpload
        self.AdminStream = self.admin.AdminStream
        self.grpc_server: grpc.Server | None = None
        self.port = 0

    @property
    def sites(self) -> dict[str, SiteConn]:
        """Every site that connected since the server started."""
        return self.state.sites

    @property
    def ws(self) -> Any:
        """The server's workspace folder."""
        return self.state.ws

    def start(self, address: str | None = None) -> int:
        """Bind the gRPC port and the job socket; start the scheduler. Returns the port."""
        import grpc

        from fedctl.transport import tls

        self.state.started_at = time.time()
        self.scheduler.recover()
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="fedctl-rpc"),
            options=rpc.SERVER_OPTIONS,
            maximum_concurrent_rpcs=512,
        )
        self.grpc_server.add_generic_rpc_handlers((rpc.generic_handler(self),))
        self.port = tls.add_secure_port(self.grpc_server, self.state.kit, address)
        self.link.start()
        self.grpc_server.start()
        threading.Thread(target=self.scheduler.loop, name="scheduler", daemon=True).start()
        log.info("server %s listening on port %d", self.state.kit.name, self.port)
        return self.port

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting work, end job processes, close every stream."""
        state = self.state
        state.stopping.set()
        state.wake.set()
        with state.lock:
            runtimes = list(state.jobs.values())
            for conn in state.sites.values():
                conn.link.close()
        for rt in runtimes:
            if rt.proc is not None and rt.proc.poll() is None:
                terminate_group(rt.proc, grace)
        if self.grpc_server is not None:
            self.grpc_server.stop(grace).wait(grace + 1)
        self.link.stop()
        state.store.close()
        state.audit.sync(10)  # the trail's last records on disk before the process ends


def serve(kit_dir: str | os.PathLike[str], workspace: str | None = None, **kwargs: Any) -> None:
    """Run a server from a kit until SIGTERM/SIGINT (what ``fedctl server start`` calls)."""
    # gRPC's C core logs every refused handshake at INFO on stderr; fedctl reports them itself.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fedctl.transport import tls

    kit = tls.load_kit(kit_dir)
    server = Server(kit, workspace, **kwargs)
    server.start()
    pid_file = server.state.ws / "run" / "server.pid"
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
