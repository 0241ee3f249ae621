"""``fedctl recipe list`` and ``fedctl recipe show NAME``: the catalog of recipe kinds.

Reads the recipe registry (class attributes and constructor signatures); nothing heavy is
imported, so the catalog prints without loading torch.
"""

from __future__ import annotations

from typing import Any

import typer

recipe_app = typer.Typer(
    help="The recipe catalog: every algorithm, its purpose and its parameters.",
    no_args_is_help=True,
)


#: catalog order: plain averaging, server optimizers, drift correction, personalization
ORDER = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "fednova",
    "scaffold",
    "fedbn",
    "fedper",
)


def _describe(cls: Any) -> dict[str, Any]:
    return {
        "kind": cls.kind,
        "class": cls.__name__,
        "summary": cls.summary,
        "paper": cls.paper,
        "example": cls.example,
        "parameters": cls.parameters(),
    }


def _catalog() -> list[dict[str, Any]]:
    import fedctl.recipe  # noqa: F401  (registers every recipe kind)
    from fedctl.recipe.jobfolder import REGISTRY

    order = {kind: i for i, kind in enumerate(ORDER)}
    classes = sorted(REGISTRY.values(), key=lambda c: (order.get(c.kind, len(order)), c.kind))
    return [_describe(cls) for cls in classes]


def _default(p: dict[str, Any]) -> str:
    return "required" if p["required"] else repr(p["default"])


def register(app: typer.Typer) -> None:
    """Attach ``recipe list`` and ``recipe show`` to the root app."""

    @recipe_app.command("list")
    def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Every recipe kind with its one-line purpose and its own parameters."""
        from rich.table import Table

        from fedctl.cli.common import console, print_json

        catalog = _catalog()
        if as_json:
            print_json(catalog)
            return
        common = {p["name"] for p in catalog[0]["parameters"]} if catalog else set()
        table = Table(box=None, pad_edge=False)
        for column in ("kind", "class", "purpose", "own parameters"):
            table.add_column(column, overflow="fold")
        for entry in catalog:
            own = [p["name"] for p in entry["parameters"] if p["name"] not in common]
            table.add_row(entry["kind"], entry["class"], entry["summary"], ", ".join(own) or "-")
        out = console()
        out.print(table)
        out.print(
            "Every recipe also takes the common arguments of fedavg (e.g. aggregator, "
            "sample_clients, federated_eval); `fedctl recipe show KIND` lists them all."
        )

    @recipe_app.command("show")
    def show(
        name: str = typer.Argument(..., help="A recipe kind (e.g. fedprox) or class name."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """A recipe's purpose, paper, example folder and every parameter with its default."""
        from rich.table import Table

        from fedctl.cli.common import console, print_json
        from fedctl.errors import UsageError

        catalog = _catalog()
        entry = next((e for e in catalog if name.lower() in (e["kind"], e["class"].lower())), None)
        if entry is None:
            kinds = ", ".join(e["kind"] for e in catalog)
            raise UsageError(f"unknown recipe {name!r} (one of: {kinds})")
        if as_json:
            print_json(entry)
            return
        out = console()
        out.print(f"[bold]{entry['kind']}[/bold]  ({entry['class']})  {entry['summary']}")
        if entry["paper"]:
            out.print(f"paper:   {entry['paper']}")
        if entry["example"]:
            out.print(f"example: fedctl simulate {entry['example']}")
        out.print(f"use:     from fedctl.recipe import {entry['class']}")
        table = Table(box=None, pad_edge=False)
        for column in ("parameter", "default", "meaning"):
            table.add_column(column, overflow="fold")
        for p in entry["parameters"]:
            table.add_row(p["name"], _default(p), p["doc"])
        out.print(table)

    app.add_typer(recipe_app, name="recipe")
