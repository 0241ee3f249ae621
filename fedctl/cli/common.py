"""Helpers shared by the CLI's commands: app settings, common options, admin kits, output."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from fedctl.cli.output import failure, print_json
from fedctl.constants import ENV_ADMIN_KIT

__all__ = ["failure", "print_json"]

#: every Typer app of the CLI: plain help (the same with every typer version, no types shown for
#: flags), help for a group given alone, no shell-completion commands, no pretty tracebacks
APP_SETTINGS: dict[str, Any] = {
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}


def one_of(*allowed: str) -> Callable[[Any], Any]:
    """An option callback that makes any other value a usage error (exit 2, with the usage
    line), checked while the command line is parsed, before the command does anything."""

    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


KIT_OPTION = typer.Option(
    None,
    "--kit",
    help="Admin startup kit (default: $FEDCTL_ADMIN_KIT, else the POC's project admin).",
)
POC_OPTION = typer.Option(None, "--poc-workspace", help="POC workspace (default ~/.fedctl/poc).")
JSON_OPTION = typer.Option(
    False, "--json", help="Print one JSON document: {ok, command, result, error}."
)


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


def when(ts: float | None) -> str:
    """A timestamp as local time, or '-'."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def console() -> Any:
    """A rich console for stdout; tables are not squeezed when stdout is not a terminal."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)
