"""``fedctl submit job``, ``fedctl job …``, ``fedctl sites``: the admin commands.

Identity comes from the admin kit's certificate. Every command has ``--json`` (the envelope of
:mod:`fedctl.cli.output`; a job is ``job_id`` and its state ``status`` everywhere, ``round`` is
1-based); exit codes: 0 done, 1 the job failed or was aborted (when following it: ``submit job``
without ``--detach``, ``job logs --follow``), 2 bad input, 3 permission denied, 4 no such job.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from fedctl.cli.common import (
    APP_SETTINGS,
    JSON_OPTION,
    KIT_OPTION,
    POC_OPTION,
    admin_client,
    console,
    failure,
    one_of,
    print_json,
    when,
)

submit_app = typer.Typer(help="Submit work to a server.", **APP_SETTINGS)
job_app = typer.Typer(help="List, inspect, abort and download jobs.", **APP_SETTINGS)
JOB_ID = typer.Argument(..., metavar="JOB_ID", help="The job's id (see `fedctl job list`).")


def _round(job: dict[str, Any]) -> str:
    """``3/5`` for a job in (or last at) its third round of five; ``-`` before the first."""
    return f"{job['round']}/{job['num_rounds']}" if job.get("round") is not None else "-"


def _outcome(job_id: str, status: str, reason: str | None) -> int:
    """Exit code for a job that was followed to its end: 0 only if it finished."""
    if status == "FINISHED":
        return 0
    return failure(f"job {job_id} {status}" + (f": {reason}" if reason else ""))


@submit_app.command("job")
def submit_job(
    recipe: str = typer.Argument(
        ..., metavar="RECIPE", help="Recipe file, folder holding recipe.py, or job folder."
    ),
    target: str = typer.Option(
        "poc", "--target", callback=one_of("poc", "prod"), help="poc (the local POC) or prod."
    ),
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
    """Submit RECIPE as a job; by default follow it live, download its results and exit with its
    outcome (0 only if it finished); with --detach, exit once it is submitted."""
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
                print(f"submitted {job['job_id']} ({job['status']})")
            return 0
        run = follow_job(
            admin,
            job["job_id"],
            title=f"{job['name']} · {target} · job {job['job_id']}",
            num_rounds=job["num_rounds"],
            results=results,
            mode=target,
            display="none" if as_json else "auto",
            started=started,
        )
    if as_json:
        print_json(run.to_json())
    return _outcome(run.job_id, run.status, run.reason)


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
    for col in ("job", "status", "round", "submitter", "submitted", "reason"):
        table.add_column(col)
    for j in jobs:
        table.add_row(
            j["job_id"],
            j["status"],
            _round(j),
            j["submitter"],
            when(j["submitted_at"]),
            j.get("reason") or "",
        )
    console().print(table)
    return 0


@job_app.command("status")
def job_status(
    job_id: str = JOB_ID,
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
    print(f"job       {job['job_id']} ({job['name']}, {job['kind']})")
    print(f"status    {job['status']}" + (f": {job['reason']}" if job.get("reason") else ""))
    print(f"round     {_round(job)}")
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
    job_id: str = JOB_ID,
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
        reason = f" ({job['reason']})" if job.get("reason") else ""
        print(f"{job['job_id']}: {job['status']}{reason}")
    return 0


@job_app.command("download")
def job_download(
    job_id: str = JOB_ID,
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
        print_json({"job_id": job_id, "out": str(path), "files": files})
    else:
        print(f"downloaded {job_id} to {path} ({len(files)} files)")
    return 0


@job_app.command("logs")
def job_logs(
    job_id: str = JOB_ID,
    site: str | None = typer.Option(None, "--site", help="A site's script output instead."),
    follow: bool = typer.Option(
        False,
        "--follow",
        "-f",
        help="Keep printing until the job ends, then exit with its outcome (0 only if FINISHED).",
    ),
    kit: Path | None = KIT_OPTION,
    poc_workspace: Path | None = POC_OPTION,
    as_json: bool = JSON_OPTION,
) -> int:
    """Print the job's log (or one site's script output)."""
    with admin_client(kit, poc_workspace) as admin:
        if as_json:
            text = b"".join(admin.logs(job_id, site, follow)).decode(errors="replace")
            result: dict[str, Any] = {"job_id": job_id, "site": site, "lines": text.splitlines()}
        else:
            result = {}
            for piece in admin.logs(job_id, site, follow):
                sys.stdout.write(piece.decode(errors="replace"))
                sys.stdout.flush()
        job = admin.status(job_id) if follow else None
    if job is not None:
        result.update(status=job["status"], reason=job.get("reason"))
    if as_json:
        print_json(result)
    return _outcome(job_id, job["status"], job.get("reason")) if job is not None else 0


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
