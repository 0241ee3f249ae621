"""``fedctl simulate``: run a recipe in the Ray-backed simulator."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the command to the root app."""

    @app.command("simulate")
    def simulate(recipe: str = typer.Argument(..., help="Recipe file or folder.")) -> None:
        """Run a recipe in simulation."""
        raise typer.Exit(1)
