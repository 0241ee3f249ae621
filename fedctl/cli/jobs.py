"""``fedctl submit job``, ``fedctl job …``, ``fedctl sites``: the admin commands.

Identity comes from the admin kit's certificate. Every command has ``--json``; exit codes: 0 done,
1 the job failed or was aborted (when following it), 2 bad input, 3 permission denied,
4 no such job.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fedctl.cli.common import (
    JSON_OPTION,
    KIT_OPTION,
    POC_OPTION,
    admin_client,
    console,
    print_json,
    when,
)

submit_app = typer.Typer(help="Submit work to a server.", no_args_is_help=True)
job_app = typer.Typer(help="List, inspect, abort and download jobs.", no_args_is_help=True)


@submit_app.command("job")
def submit_job(
    recipe: str = typer.Argument(..., help="Recipe file, folder holding recipe.py, or job folder."),
    target: str = typer.Option("poc", "--target", help="poc (the local POC) or prod."),
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed for the sites' generators."),
    follow: bool = typer.Option(
        True, "--follow/--detach", help="Show progress until the job ends."
    ),
    results: Path = typer.Option(
        Path("fedctl-runs"), "--results", help="Where to download results."
    ),
    as_json: bool = JSON_OPTION,
) -> int:
    """Submit RECIPE as a job; by default follow it live and download its results."""
    import time

    from fedctl.errors import UsageError
    from fedctl.runtime.envs import follow_job

    if target not in ("poc", "prod"):
        raise UsageError(f"--target must be poc or prod, got {target!r}")
    started = time.monotonic()
    with admin_client(kit, poc_workspace, target) as admin:
        job = admin.submit(recipe, seed=seed)
        if not follow:
            if as_json:
                print_json(job)
            else:
                print(f"submitted {job['id']} ({job['state']})")
            return 0
        run = follow_job(
            admin,
            job["id"],
            title=f"{job['name']} · {target} · job {job['id']}",
            num_rounds=job["num_rounds"],
            results=results,
            mode=target,
            display="none" if as_json else "auto",
            started=started,
        )
    if as_json:
        print_json(run.to_json())
    return 0 if run.ok else 1


@job_app.command("list")
def job_list(
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """All jobs on the server, oldest first."""
    with admin_client(kit, poc_workspace) as admin:
        jobs = admin.list_jobs()
    if as_json:
        print_json(jobs)
        return 0
    from rich.table import Table

    table = Table(box=None)
    for col in ("id", "state", "round", "submitter", "submitted", "reason"):
        table.add_column(col)
    for j in jobs:
        rnd = f"{j['round'] + 1}/{j['num_rounds']}" if j.get("round") is not None else "-"
        table.add_row(
            j["id"], j["state"], rnd, j["submitter"], when(j["submitted_at"]), j.get("reason") or ""
        )
    console().print(table)
    return 0


@job_app.command("status")
def job_status(
    job_id: str,
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """State, round, sites and latest metrics of a job."""
    with admin_client(kit, poc_workspace) as admin:
        job = admin.status(job_id)
    if as_json:
        print_json(job)
        return 0
    rnd = f"{job['round'] + 1}/{job['num_rounds']}" if job.get("round") is not None else "-"
    print(f"job       {job['id']} ({job['name']}, {job['kind']})")
    print(f"state     {job['state']}" + (f": {job['reason']}" if job.get("reason") else ""))
    print(f"round     {rnd}")
    deployed = ", ".join(job["deployed"]) or "-"
    print(f"sites     {', '.join(job['sites']) or '-'}  (deployed: {deployed})")
    for site, why in (job.get("refused") or {}).items():
        print(f"refused   {site}: {why}")
    metrics = "  ".join(f"{k}={v:.4g}" for k, v in (job.get("metrics") or {}).items())
    print(f"metrics   {metrics or '-'}")
    print(f"submitted {when(job['submitted_at'])} by {job['submitter']}")
    return 0


@job_app.command("abort")
def job_abort(
    job_id: str,
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """Abort a job (its sites stop their scripts)."""
    with admin_client(kit, poc_workspace) as admin:
        job = admin.abort(job_id)
    if as_json:
        print_json(job)
    else:
        print(f"{job['id']}: {job['state']}" + (f" ({job['reason']})" if job.get("reason") else ""))
    return 0


@job_app.command("download")
def job_download(
    job_id: str,
    out: Path = typer.Option(..., "-o", "--out", help="Folder to create."),
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """Download a job's final model, metrics and logs."""
    with admin_client(kit, poc_workspace) as admin:
        path = admin.download(job_id, out)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    if as_json:
        print_json({"job": job_id, "out": str(path), "files": files})
    else:
        print(f"downloaded {job_id} to {path} ({len(files)} files)")
    return 0


@job_app.command("logs")
def job_logs(
    job_id: str,
    site: str | None = typer.Option(None, "--site", help="A site's script output instead."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """Print the job's log (or one site's script output)."""
    with admin_client(kit, poc_workspace) as admin:
        if as_json:
            text = b"".join(admin.logs(job_id, site, follow)).decode(errors="replace")
            print_json({"job": job_id, "site": site, "lines": text.splitlines()})
            return 0
        for piece in admin.logs(job_id, site, follow):
            sys.stdout.write(piece.decode(errors="replace"))
            sys.stdout.flush()
    return 0


def sites(
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """Sites known to the server: online, last heartbeat, running jobs."""
    with admin_client(kit, poc_workspace) as admin:
        rows = admin.sites()
    if as_json:
        print_json(rows)
        return 0
    from rich.table import Table

    table = Table(box=None)
    for col in ("site", "org", "online", "last heartbeat", "jobs"):
        table.add_column(col)
    for s in rows:
        table.add_row(
            s["name"],
            s["org"],
            "yes" if s["online"] else "no",
            when(s["last_heartbeat"]),
            ", ".join(s["jobs"]) or "-",
        )
    console().print(table)
    return 0


def register(app: typer.Typer) -> None:
    """Attach the commands to the root app."""
    app.add_typer(submit_app, name="submit")
    app.add_typer(job_app, name="job")
    app.command("sites")(sites)
