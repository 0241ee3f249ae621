"""``fedctl poc``: a real server and sites on localhost, from a provisioned project."""

from __future__ import annotations

from pathlib import Path

import typer

from fedctl.cli.common import APP_SETTINGS, JSON_OPTION, failure, print_json

poc_app = typer.Typer(
    help="A local proof-of-concept cluster: real processes, mutual TLS, 127.0.0.1.",
    **APP_SETTINGS,
)
WS = typer.Option(
    None, "--workspace", help="POC workspace (default: $FEDCTL_POC_WORKSPACE or ~/.fedctl/poc)."
)


@poc_app.command("prepare")
def prepare(
    clients: int | None = typer.Option(
        None, "--clients", "-n", help="Sites site-1 … site-N (default 2)."
    ),
    sites: str | None = typer.Option(None, "--sites", help="Comma-separated site names instead."),
    port: int = typer.Option(8002, "--port", help="Server port on 127.0.0.1."),
    workspace: Path | None = WS,
    force: bool = typer.Option(False, "--force", help="Stop and replace an existing POC."),
    offline_grace: float = typer.Option(
        60.0, "--offline-grace", help="Seconds a site may be offline before its tasks fail."
    ),
    he: bool = typer.Option(
        False, "--he", help="Give the project a CKKS context (jobs with homomorphic_encryption)."
    ),
    as_json: bool = JSON_OPTION,
) -> int:
    """Provision a localhost project: server, sites and an admin kit for each role."""
    from fedctl.runtime import poc

    names = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    info = poc.prepare(
        workspace,
        clients=clients,
        sites=names,
        port=port,
        force=force,
        offline_grace=offline_grace,
        he=he,
    )
    if as_json:
        print_json(info)
    else:
        print(
            f"prepared POC in {info['workspace']}: server 127.0.0.1:{info['port']}, "
            f"sites {', '.join(info['sites'])}"
        )
        print("next: fedctl poc start")
    return 0


@poc_app.command("start")
def start(
    site: str | None = typer.Option(None, "--site", help="Start only this site (and the server)."),
    workspace: Path | None = WS,
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait until ready."),
    as_json: bool = JSON_OPTION,
) -> int:
    """Start the server and sites in the background; return once they are connected."""
    from fedctl.runtime import poc

    state = poc.start(workspace, site=site, timeout=timeout)
    if as_json:
        print_json(state)
    else:
        started = ", ".join(state["started"]) or "nothing (already running)"
        print(f"started {started}; logs in {Path(state['workspace']) / 'logs'}")
        print("next: fedctl submit job recipes/hello_pt --target poc")
    return 0


@poc_app.command("status")
def status(workspace: Path | None = WS, as_json: bool = JSON_OPTION) -> int:
    """Which POC processes run and which sites the server sees; exit 1 if the server is not
    running."""
    from fedctl.runtime import poc

    state = poc.status(workspace)
    running = state["processes"]["server"]["running"]
    if as_json:
        print_json(state)
        return 0 if running else failure("the POC server is not running (fedctl poc start)")
    for name, proc in state["processes"].items():
        print(
            f"{name:<12} {'running' if proc['running'] else 'stopped':<8} PID {proc['pid'] or '-'}"
        )
    if state["sites"] is not None:
        online = [s["name"] for s in state["sites"] if s["online"]]
        print(f"server sees: {', '.join(online) or 'no sites'}")
    return 0 if running else failure("the POC server is not running (fedctl poc start)")


@poc_app.command("stop")
def stop(
    site: str | None = typer.Option(None, "--site", help="Stop only this site."),
    workspace: Path | None = WS,
    as_json: bool = JSON_OPTION,
) -> int:
    """Stop exactly the processes `fedctl poc start` started."""
    from fedctl.runtime import poc

    stopped = poc.stop(workspace, site=site)
    if as_json:
        print_json({"stopped": stopped})
    else:
        print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


@poc_app.command("clean")
def clean(workspace: Path | None = WS, as_json: bool = JSON_OPTION) -> int:
    """Stop everything and delete the POC workspace (kits, logs, results)."""
    from fedctl.runtime import poc

    path = poc.clean(workspace)
    if as_json:
        print_json({"removed": str(path)})
    else:
        print(f"removed {path}")
    return 0


def register(app: typer.Typer) -> None:
    """Attach the group to the root app."""
    app.add_typer(poc_app, name="poc")
