"""``fedctl report``: an HTML report (and PNGs) of a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from fedctl.cli.common import JSON_OPTION, print_json


def register(app: typer.Typer) -> None:
    """Attach the command to the root app."""

    @app.command("report")
    def report(
        run: str = typer.Argument(
            ...,
            metavar="RUN_DIR|JOB_ID",
            help="A run folder (simulation, or a job downloaded with `fedctl job download`), a "
            "workspace of runs (its newest), or a job id under --workspace.",
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="The HTML file to write (default: RUN_DIR/report.html)."
        ),
        png: bool = typer.Option(
            False,
            "--png",
            help="Also write each chart as a PNG (needs matplotlib, the report extra).",
        ),
        workspace: Path = typer.Option(
            Path("fedctl-runs"), "--workspace", help="Where a JOB_ID is looked up."
        ),
        as_json: bool = JSON_OPTION,
    ) -> int:
        """Write a self-contained HTML report of a run: metrics, sites, failures, timings."""
        from fedctl.tracking.report import write_report
        from fedctl.tracking.rundata import find_run

        run_dir, note = find_run(run, workspace)
        result = write_report(run_dir, out, with_png=png)
        if as_json:
            print_json({**result.to_json(), "picked": note})
            return 0
        if note:
            print(f"run:    {run_dir} ({note})")
        print(f"report: {result.html}")
        if result.pngs:
            print(f"png:    {len(result.pngs)} charts in {result.pngs[0].parent}")
        return 0
