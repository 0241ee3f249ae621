"""``fedctl simulate``: run a recipe in the Ray-backed simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fedctl.cli.common import JSON_OPTION, failure, one_of, print_json


def register(app: typer.Typer) -> None:
    """Attach the command to the root app."""

    @app.command("simulate")
    def simulate(
        recipe: str = typer.Argument(
            ..., metavar="RECIPE", help="Recipe file, folder holding recipe.py, or job folder."
        ),
        clients: int | None = typer.Option(
            None, "--clients", "-n", help="Number of virtual sites."
        ),
        workers: int | None = typer.Option(
            None, "--workers", "-w", help="Worker processes (default: min(clients, CPUs))."
        ),
        rounds: int | None = typer.Option(None, "--rounds", "-r", help="Override num_rounds."),
        workspace: Path | None = typer.Option(
            None, "--workspace", help="Where run folders are created (default: ./fedctl-runs)."
        ),
        seed: int | None = typer.Option(None, "--seed", help="Seed (same seed, same model)."),
        backend: str | None = typer.Option(
            None,
            "--backend",
            callback=one_of("auto", "process", "ray", "local"),
            help="'auto' (default: Ray for a cluster or GPUs, else processes), 'process', "
            "'ray' or 'local' (one in-process worker, to debug).",
        ),
        as_json: bool = JSON_OPTION,
    ) -> int:
        """Run RECIPE with N simulated sites and show its progress; exit 0 only on success."""
        from dataclasses import replace

        from fedctl.errors import UsageError
        from fedctl.recipe.loader import load_recipe
        from fedctl.sim.env import SimEnv

        loaded = load_recipe(recipe)
        r = loaded.recipe
        if rounds is not None:
            r = r.with_overrides(num_rounds=rounds)
        env = loaded.env if isinstance(loaded.env, SimEnv) else SimEnv(num_clients=r.min_clients)
        changes: dict[str, Any] = {}
        for key, value in (
            ("num_clients", clients),
            ("workers", workers),
            ("workspace", workspace),
            ("seed", seed),
            ("backend", backend),
        ):
            if value is not None:
                changes[key] = value
        if as_json:
            changes["display"] = "none"
        if clients is not None and env.sites is not None:
            changes["sites"] = None
        try:
            env = replace(env, **changes)
        except TypeError as exc:  # pragma: no cover - options map 1:1 to fields
            raise UsageError(str(exc)) from None
        run = r.run(env)
        if as_json:
            print_json(run.to_json())
        if run.ok:
            return 0
        code = 130 if run.status == "ABORTED" and run.reason == "interrupted by the user" else 1
        return failure(f"{run.name} {run.status}: {run.reason}", code)
