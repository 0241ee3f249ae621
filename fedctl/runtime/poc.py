"""POC mode: a provisioned project on localhost, its server and sites as background processes.

    fedctl poc prepare --clients 2      # provision a localhost project (one admin per role)
    fedctl poc start                    # server + sites in the background; waits until ready
    fedctl submit job recipes/hello_pt --target poc
    fedctl poc stop                     # stops exactly the processes `poc start` started

The workspace (``~/.fedctl/poc`` or ``$FEDCTL_POC_WORKSPACE`` or ``--workspace``) holds
``poc.json`` (what was prepared), ``provision/`` (the project: ``state/`` with the CA and
``kits/<name>/`` for the server ``localhost``, each site and one admin per role),
``run/<name>.json`` (pid, start time and command of each process started) and
``logs/<name>.log``. Everything binds 127.0.0.1. Results of jobs stay on the server
(``provision/kits/localhost/workspace/jobs/``) until the workspace is cleaned.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedctl.constants import ENV_POC_WORKSPACE
from fedctl.errors import FedctlError, NotFound, UsageError
from fedctl.runtime.procs import terminate_group

POC_FILE = "poc.json"
DEFAULT_PORT = 8002


def default_workspace() -> Path:
    """``$FEDCTL_POC_WORKSPACE`` or ``~/.fedctl/poc``."""
    env = os.environ.get(ENV_POC_WORKSPACE)
    return Path(env) if env else Path.home() / ".fedctl" / "poc"


def _ws(workspace: str | os.PathLike[str] | None) -> Path:
    return Path(workspace).resolve() if workspace else default_workspace().resolve()


def load_info(workspace: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What ``prepare`` wrote; a clear error if the workspace was never prepared."""
    ws = _ws(workspace)
    try:
        info = json.loads((ws / POC_FILE).read_text())
    except FileNotFoundError:
        raise NotFound(f"no POC workspace at {ws}: run `fedctl poc prepare` first") from None
    info["workspace"] = str(ws)
    return info


def prepare(
    workspace: str | os.PathLike[str] | None = None,
    *,
    clients: int | None = None,
    sites: list[str] | None = None,
    port: int = DEFAULT_PORT,
    force: bool = False,
    offline_grace: float = 60.0,
    he: bool = False,
) -> dict[str, Any]:
    """Provision a localhost project (server, sites, one admin kit per role; with ``he``, a
    CKKS context: sites get the secret one, the server the public one)."""
    from fedctl.provision import poc_project, provision

    ws = _ws(workspace)
    if clients is not None and sites:
        raise UsageError("give either --clients or --sites, not both")
    if clients is not None and clients < 1:
        raise UsageError(f"--clients must be at least 1, got {clients}")
    names: int | list[str] = list(sites) if sites else (clients or 2)
    if (ws / POC_FILE).exists():
        if not force:
            raise UsageError(f"{ws} is already prepared (use --force to start over)")
        stop(ws)
        shutil.rmtree(ws)
    project = poc_project(names, port=port, homomorphic_encryption={} if he else None)
    result = provision(project, ws / "provision")
    kits = {rec.identity.name: str(rec.kit_dir) for rec in result.kits}
    admins = {
        rec.identity.role: str(rec.kit_dir) for rec in result.kits if rec.identity.type == "admin"
    }
    info = {
        "project": project.name,
        "port": port,
        "offline_grace": offline_grace,
        "server": kits[project.server.name],
        "sites": {s.name: kits[s.name] for s in project.sites},
        "admins": admins,
    }
    ws.mkdir(parents=True, exist_ok=True)
    (ws / POC_FILE).write_text(json.dumps(info, indent=2))
    info["workspace"] = str(ws)
    return info


def admin_kit(workspace: str | os.PathLike[str] | None = None, role: str = "project_admin") -> str:
    """The POC admin kit for ``role``."""
    info = load_info(workspace)
    try:
        return info["admins"][role]
    except KeyError:
        raise UsageError(f"the POC has no admin with role {role!r}") from None


# ------------------------------------------------------------------------------------ processes


def _record_path(ws: Path, name: str) -> Path:
    return ws / "run" / f"{name}.json"


def _alive(record: dict[str, Any]) -> bool:
    """True if the recorded process still runs (same PID *and* same start time)."""
    import psutil

    try:
        proc = psutil.Process(record["pid"])
        return abs(proc.create_time() - record["create_time"]) < 1.0 and proc.is_running()
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return False


def _read_record(ws: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(ws, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def port_owner(port: int) -> str | None:
    """Who listens on 127.0.0.1:``port`` ("PID n (command)"), or None if the port is free."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # like the server itself: connections lingering in TIME_WAIT do not make the port busy
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
        return None
    except OSError:
        pass
    finally:
        probe.close()
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN
            if conn.laddr and conn.laddr.port == port and listening and conn.pid:
                with contextlib.suppress(psutil.Error):
                    cmd = " ".join(psutil.Process(conn.pid).cmdline())[:80]
                    return f"PID {conn.pid} ({cmd})"
                return f"PID {conn.pid}"
    except Exception:
        pass
    return "another process"


def _spawn(ws: Path, name: str, cmd: list[str]) -> dict[str, Any]:
    import psutil

    (ws / "run").mkdir(exist_ok=True)
    (ws / "logs").mkdir(exist_ok=True)
    log = open(ws / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log.close()
    record = {
        "name": name,
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "cmd": cmd,
    }
    _record_path(ws, name).write_text(json.dumps(record))
    return record


def _fedctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedctl.cli.main", *args]


def start(
    workspace: str | os.PathLike[str] | None = None,
    *,
    site: str | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Start the server (unless running) and the sites (or one ``site``); wait until ready."""
    from fedctl.runtime.admin import AdminClient

    info = load_info(workspace)
    ws = Path(info["workspace"])
    names = list(info["sites"]) if site is None else [site]
    unknown = [n for n in names if n not in info["sites"]]
    if unknown:
        raise UsageError(f"no site {unknown[0]!r} in this POC (sites: {', '.join(info['sites'])})")
    started: list[str] = []
    record = _read_record(ws, "server")
    if record is None or not _alive(record):
        owner = port_owner(int(info["port"]))
        if owner is not None:
            raise FedctlError(
                f"port {info['port']} is in use by {owner}; stop it or run "
                "`fedctl poc prepare --force --port N` with a free port"
            )
        grace = str(info.get("offline_grace", 60.0))
        cmd = _fedctl(
            "server",
            "start",
            "--kit",
            info["server"],
            "--mode",
            "poc",
            "--offline-grace",
            grace,
            "--allow-server-code",  # POC runs on the user's own machine: server_eval allowed
        )
        _spawn(ws, "server", cmd)
        started.append("server")
    for name in names:
        rec = _read_record(ws, name)
        if rec is None or not _alive(rec):
            _spawn(ws, name, _fedctl("client", "start", "--kit", info["sites"][name]))
            started.append(name)
    deadline = time.monotonic() + timeout
    with AdminClient(info["admins"]["project_admin"]) as admin:
        while True:
            try:
                online = {s["name"] for s in admin.sites() if s["online"]}
                if all(n in online for n in names):
                    break
            except FedctlError:
                pass
            for name in ("server", *names):
                rec = _read_record(ws, name)
                if rec is not None and not _alive(rec):
                    tail = _log_tail(ws, name)
                    raise FedctlError(f"POC {name} exited during start-up: {tail}")
            if time.monotonic() > deadline:
                raise FedctlError(
                    f"POC not ready after {timeout:.0f}s; see the logs in {ws / 'logs'}"
                )
            time.sleep(0.3)
    return {"started": started, **status(ws)}


def _log_tail(ws: Path, name: str) -> str:
    try:
        lines = (ws / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def status(workspace: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Processes of this POC (running or not) and, if the server answers, its sites."""
    from fedctl.runtime.admin import AdminClient

    info = load_info(workspace)
    ws = Path(info["workspace"])
    procs = {}
    for name in ("server", *info["sites"]):
        rec = _read_record(ws, name)
        procs[name] = {"pid": rec["pid"] if rec else None, "running": bool(rec and _alive(rec))}
    sites: list[dict[str, Any]] | None = None
    if procs["server"]["running"]:
        with (
            contextlib.suppress(FedctlError),
            AdminClient(info["admins"]["project_admin"]) as admin,
        ):
            sites = admin.sites()
    return {"workspace": str(ws), "port": info["port"], "processes": procs, "sites": sites}


def stop(
    workspace: str | os.PathLike[str] | None = None,
    *,
    site: str | None = None,
    timeout: float = 15.0,
) -> list[str]:
    """Stop exactly the processes ``start`` recorded (checked by PID and start time)."""
    ws = _ws(workspace)
    if not (ws / POC_FILE).exists():
        return []
    info = load_info(ws)
    names = [site] if site else [*info["sites"], "server"]
    stopped = []
    for name in names:
        rec = _read_record(ws, name)
        if rec is None:
            continue
        if _alive(rec):
            terminate_group(int(rec["pid"]), timeout)
            stopped.append(name)
        _record_path(ws, name).unlink(missing_ok=True)
    return stopped


def clean(workspace: str | os.PathLike[str] | None = None) -> Path:
    """Stop everything and delete the POC workspace (kits, logs, job results)."""
    ws = _ws(workspace)
    stop(ws)
    if ws.exists():
        shutil.rmtree(ws)
    return ws
