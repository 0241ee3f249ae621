"""Helpers shared by the CLI's runtime commands: admin kit resolution and output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from fedctl.constants import ENV_ADMIN_KIT

KIT_OPTION = typer.Option(
    None,
    "--kit",
    help="Admin startup kit (default: $FEDCTL_ADMIN_KIT, else the POC's project admin).",
)
POC_OPTION = typer.Option(None, "--poc-workspace", help="POC workspace (default ~/.fedctl/poc).")
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def admin_client(
    kit: Path | None, poc_workspace: Path | None = None, target: str | None = None
) -> Any:
    """An AdminClient for ``--kit``, ``$FEDCTL_ADMIN_KIT`` or the POC's project admin kit."""
    from fedctl.errors import UsageError
    from fedctl.runtime.admin import AdminClient

    if kit is None and target != "poc" and os.environ.get(ENV_ADMIN_KIT):
        kit = Path(os.environ[ENV_ADMIN_KIT])
    if kit is None:
        if target == "prod":
            raise UsageError(
                "--target prod needs --kit (an admin startup kit) or $FEDCTL_ADMIN_KIT"
            )
        from fedctl.runtime import poc

        kit = Path(poc.admin_kit(poc_workspace))
    return AdminClient(kit)


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    print(json.dumps(data, indent=2, default=str))


def when(ts: float | None) -> str:
    """A timestamp as local time, or '-'."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def console() -> Any:
    """A rich console for stdout; tables are not squeezed when stdout is not a terminal."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)
