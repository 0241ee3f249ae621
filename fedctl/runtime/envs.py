"""``PocEnv`` and ``ProdEnv``: ``recipe.run(env)`` on a real server.

Both submit the recipe as a job with an admin kit, follow it with the same live display as the
simulator, download its results when it ends, and return a :class:`~fedctl.tracking.run.Run`
whose folder (``<results>/<job id>/``) stays until you remove it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.errors import UsageError

if TYPE_CHECKING:  # fedctl.recipe imports this module: no import of it at load time
    from fedctl.tracking.run import Run


def follow_job(
    admin: Any,
    job_id: str,
    *,
    title: str,
    num_rounds: int,
    results: str | os.PathLike[str],
    mode: str,
    display: str = "auto",
    started: float | None = None,
) -> Run:
    """Follow a submitted job to its end with the live display; download and describe it."""
    from fedctl.tracking.display import Display
    from fedctl.tracking.run import Run

    started = started if started is not None else time.monotonic()
    shown = Display(title, num_rounds, display)
    with shown:
        for ev in admin.follow(job_id):
            if ev["t"] == "end":
                break
            if ev.get("event") in (
                "round_started",
                "result",
                "round_completed",
                "warning",
                "resumed",
            ):
                shown.listener(ev)
    status = admin.status(job_id)
    state = status["status"]
    out = Path(results) / job_id
    admin.download(job_id, out)
    models = out / "models"
    final = models / "final.safetensors"
    best = models / "best.safetensors"
    history = []
    global_jsonl = out / "metrics" / "global.jsonl"
    if global_jsonl.exists():
        import json

        history = [json.loads(line) for line in global_jsonl.read_text().splitlines() if line]
    run = Run(
        job_id=job_id,
        name=status["name"],
        mode=mode,
        status=state,
        reason=status.get("reason"),
        result_dir=out,
        final_model=final if state == "FINISHED" and final.exists() else None,
        best_model=best if best.exists() else None,
        metrics=history,
        rounds_completed=len(history),
        num_rounds=status.get("num_rounds", num_rounds),
        duration=time.monotonic() - started,
        extra={"sites": status.get("sites"), "seed": status.get("seed")},
    )
    lines = [f"results:     {out}"]
    if run.final_model:
        lines.append(f"final model: {run.final_model}")
    shown.summary(state, run.reason, lines)
    return run


@dataclass
class ProdEnv:
    """A provisioned server, reached with an admin kit (``address`` overrides the kit's)."""

    admin_kit: str | os.PathLike[str]
    address: str | None = None
    seed: int = 0
    results: str | os.PathLike[str] = "fedctl-runs"
    display: str = "auto"
    mode: str = "production"

    def run(self, recipe: Any) -> Run:
        """Submit ``recipe``, follow it, download its results."""
        from fedctl.runtime.admin import AdminClient

        if self.admin_kit is None:
            raise UsageError("ProdEnv needs admin_kit (the folder of an admin startup kit)")
        started = time.monotonic()
        with AdminClient(self.admin_kit, self.address) as admin:
            job = admin.submit_recipe(recipe, seed=self.seed)
            title = f"{recipe.name} · {self.mode} · job {job['job_id']}"
            return follow_job(
                admin,
                job["job_id"],
                title=title,
                num_rounds=recipe.num_rounds,
                results=self.results,
                mode=self.mode,
                display=self.display,
                started=started,
            )


@dataclass
class PocEnv:
    """The local POC cluster (``fedctl poc prepare`` and ``fedctl poc start`` first)."""

    workspace: str | os.PathLike[str] | None = None
    seed: int = 0
    results: str | os.PathLike[str] = "fedctl-runs"
    display: str = "auto"
    role: str = "project_admin"

    def run(self, recipe: Any) -> Run:
        """Submit ``recipe`` to the POC server, follow it, download its results."""
        from fedctl.runtime.poc import admin_kit, status

        state = status(self.workspace)
        if not state["processes"]["server"]["running"]:
            raise UsageError("the POC server is not running: run `fedctl poc start` first")
        env = ProdEnv(
            admin_kit(self.workspace, self.role),
            seed=self.seed,
            results=self.results,
            display=self.display,
            mode="poc",
        )
        return env.run(recipe)
