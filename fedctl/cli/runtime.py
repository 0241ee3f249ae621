"""``fedctl server``, ``fedctl client``: run a server or a site agent from its startup kit."""

from __future__ import annotations

from pathlib import Path

import typer

from fedctl.cli.common import APP_SETTINGS, JSON_OPTION, failure, one_of, print_json

server_app = typer.Typer(help="Run the federation server from its startup kit.", **APP_SETTINGS)
client_app = typer.Typer(help="Run a site agent from its startup kit.", **APP_SETTINGS)
SERVER_KIT = typer.Option(..., "--kit", metavar="KIT", help="The server's startup kit folder.")
SITE_KIT = typer.Option(..., "--kit", metavar="KIT", help="The site's startup kit folder.")


def _stop(kit: Path, pid_file: Path, what: str, as_json: bool) -> int:
    import os
    import signal
    import time

    from fedctl.errors import NotFound

    if not kit.is_dir():
        raise NotFound(f"{kit}: no such kit folder")
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        raise NotFound(f"no running {what} recorded in {pid_file}") from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        raise NotFound(f"{what} (PID {pid}) is not running") from None
    stopped = False
    for _ in range(150):
        time.sleep(0.1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stopped = True
            break
    if as_json:
        print_json({"stopped": stopped, "pid": pid, "what": what})
    if stopped:
        if not as_json:
            print(f"stopped {what} (PID {pid})")
        return 0
    message = f"{what} (PID {pid}) did not stop within 15 s"
    if not as_json:
        print(message)
    return failure(message)


def _serve_result(what: str, kit: Path, as_json: bool) -> int:
    if as_json:
        print_json({"stopped": True, "what": what, "kit": str(kit)})
    return 0


@server_app.command("start")
def server_start(
    kit: Path = SERVER_KIT,
    workspace: Path | None = typer.Option(None, "--workspace", help="Default: KIT/workspace."),
    mode: str = typer.Option(
        "production",
        "--mode",
        callback=one_of("production", "poc"),
        help="production or poc (told to scripts).",
    ),
    max_jobs: int = typer.Option(4, "--max-jobs", help="Jobs that may run at once."),
    offline_grace: float = typer.Option(
        60.0, "--offline-grace", help="Seconds a site may be offline before its tasks fail."
    ),
    allow_server_code: bool = typer.Option(
        False, "--allow-server-code", help="Let jobs run their own code here (server_eval)."
    ),
    as_json: bool = JSON_OPTION,
) -> int:
    """Serve sites and admins on the kit's port until stopped (SIGTERM/Ctrl-C)."""
    import logging

    from fedctl.runtime.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(
        kit,
        str(workspace) if workspace else None,
        mode=mode,
        max_jobs=max_jobs,
        offline_grace=offline_grace,
        allow_server_code=allow_server_code,
    )
    return _serve_result("server", kit, as_json)


@server_app.command("stop")
def server_stop(
    kit: Path = SERVER_KIT,
    workspace: Path | None = typer.Option(None, "--workspace", help="Default: KIT/workspace."),
    as_json: bool = JSON_OPTION,
) -> int:
    """Stop the server started from this kit."""
    return _stop(kit, (workspace or kit / "workspace") / "run" / "server.pid", "server", as_json)


@client_app.command("start")
def client_start(
    kit: Path = SITE_KIT,
    workspace: Path | None = typer.Option(None, "--workspace", help="Default: KIT/workspace."),
    address: str | None = typer.Option(None, "--address", help="host:port instead of the kit's."),
    as_json: bool = JSON_OPTION,
) -> int:
    """Connect this site to the server and run the jobs it deploys, until stopped."""
    import logging

    from fedctl.runtime.agent import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(kit, str(workspace) if workspace else None, address)
    return _serve_result("site agent", kit, as_json)


@client_app.command("stop")
def client_stop(
    kit: Path = SITE_KIT,
    workspace: Path | None = typer.Option(None, "--workspace", help="Default: KIT/workspace."),
    as_json: bool = JSON_OPTION,
) -> int:
    """Stop the site agent started from this kit."""
    return _stop(kit, (workspace or kit / "workspace") / "agent.pid", "site agent", as_json)


def register(app: typer.Typer) -> None:
    """Attach the command groups to the root app."""
    app.add_typer(server_app, name="server")
    app.add_typer(client_app, name="client")
