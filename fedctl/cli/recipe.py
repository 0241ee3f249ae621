"""``fedctl recipe list`` and ``fedctl recipe show NAME``: the catalog of recipe kinds.

Reads the recipe registry (class attributes and constructor signatures): fedctl's own kinds and
those of installed plugins (docs/plugins.md), which are marked. Nothing heavy is imported by
fedctl itself, so the catalog prints without loading torch (a plugin may import more).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import typer

from fedctl.cli.common import APP_SETTINGS, JSON_OPTION

recipe_app = typer.Typer(
    help="The recipe catalog: every algorithm, its purpose and its parameters.",
    **APP_SETTINGS,
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


def _describe(cls: Any, plugin: Any) -> dict[str, Any]:
    return {
        "kind": cls.kind,
        "class": cls.__name__,
        # None for fedctl's own kinds; {kind, distribution, version, target} for a plugin's
        "plugin": asdict(plugin) if plugin is not None else None,
        "summary": cls.summary,
        "paper": cls.paper,
        "example": cls.example,
        "parameters": cls.parameters(),
    }


def _catalog() -> list[dict[str, Any]]:
    import sys

    import fedctl.recipe  # noqa: F401  (registers every recipe kind of fedctl's own)
    from fedctl.recipe.registry import PLUGINS, REGISTRY, load_plugins

    for problem in load_plugins().values():
        print(f"warning: {problem}", file=sys.stderr)
    order = {kind: i for i, kind in enumerate(ORDER)}
    classes = sorted(REGISTRY.values(), key=lambda c: (order.get(c.kind, len(order)), c.kind))
    return [_describe(cls, PLUGINS.get(cls.kind)) for cls in classes]


def _unknown(name: str, catalog: list[dict[str, Any]]) -> str:
    """``unknown recipe kind 'scafold'; did you mean 'scaffold'? (kinds: …)``"""
    import difflib

    kinds = [e["kind"] for e in catalog]
    by_name = {e["kind"]: e["kind"] for e in catalog}
    by_name.update({e["class"].lower(): e["kind"] for e in catalog})
    close = difflib.get_close_matches(name.lower(), list(by_name), n=1, cutoff=0.6)
    guess = f"; did you mean {by_name[close[0]]!r}?" if close else ""
    return f"unknown recipe kind {name!r}{guess} (kinds: {', '.join(kinds)})"


def _default(p: dict[str, Any]) -> str:
    return "required" if p["required"] else repr(p["default"])


def register(app: typer.Typer) -> None:
    """Attach ``recipe list`` and ``recipe show`` to the root app."""

    @recipe_app.command("list")
    def list_(as_json: bool = JSON_OPTION) -> None:
        """Every recipe kind with its one-line purpose and its own parameters."""
        from rich.table import Table

        from fedctl.cli.common import console, print_json

        catalog = _catalog()
        if as_json:
            print_json(catalog)
            return
        common = {p["name"] for p in catalog[0]["parameters"]} if catalog else set()
        table = Table(box=None, pad_edge=False)
        for column in ("kind", "class", "purpose"):
            table.add_column(column, overflow="fold")
        table.add_column("own parameters", overflow="fold", max_width=40)  # the purpose first
        for entry in catalog:
            own = [p["name"] for p in entry["parameters"] if p["name"] not in common]
            summary = entry["summary"]
            if entry["plugin"]:
                summary = f"{summary} (plugin {entry['plugin']['distribution']})"
            table.add_row(entry["kind"], entry["class"], summary, ", ".join(own) or "-")
        out = console()
        out.print(table)
        out.print(
            "Every recipe also takes the common arguments of fedavg (e.g. aggregator, "
            "sample_clients, federated_eval); `fedctl recipe show KIND` lists them all."
        )

    @recipe_app.command("show")
    def show(
        name: str = typer.Argument(
            ..., metavar="KIND", help="A recipe kind (e.g. fedprox) or class name."
        ),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """A recipe's purpose, paper, example folder and every parameter with its default."""
        from rich.table import Table

        from fedctl.cli.common import console, print_json
        from fedctl.errors import UsageError

        catalog = _catalog()
        entry = next((e for e in catalog if name.lower() in (e["kind"], e["class"].lower())), None)
        if entry is None:
            raise UsageError(_unknown(name, catalog))
        if as_json:
            print_json(entry)
            return
        out = console()
        out.print(f"[bold]{entry['kind']}[/bold]  ({entry['class']})  {entry['summary']}")
        if entry["paper"]:
            out.print(f"paper:   {entry['paper']}")
        if entry["example"]:
            out.print(f"example: fedctl simulate {entry['example']}")
        plugin = entry["plugin"]
        if plugin:
            out.print(f"plugin:  {plugin['distribution']} {plugin['version']} ({plugin['target']})")
            module = plugin["target"].split(":")[0]
            out.print(f"use:     from {module} import {entry['class']}")
        else:
            out.print(f"use:     from fedctl.recipe import {entry['class']}")
        table = Table(box=None, pad_edge=False)
        for column in ("parameter", "default", "meaning"):
            table.add_column(column, overflow="fold")
        for p in entry["parameters"]:
            table.add_row(p["name"], _default(p), p["doc"])
        out.print(table)

    app.add_typer(recipe_app, name="recipe")
