"""``fedctl audit verify LOG``: check an audit trail's hash chain."""

from __future__ import annotations

from pathlib import Path

import typer

from fedctl.cli.common import JSON_OPTION, print_json

audit_app = typer.Typer(help="Audit trails of servers and sites.", no_args_is_help=True)


@audit_app.command("verify")
def verify(
    log: Path = typer.Argument(..., help="An audit.jsonl (e.g. KIT/workspace/audit.jsonl)."),
    as_json: bool = JSON_OPTION,
) -> int:
    """Exit 0 if every record is intact and in order; 1 and the problems otherwise."""
    from fedctl.errors import NotFound
    from fedctl.runtime.audit import verify as check

    if not log.is_file():
        raise NotFound(f"{log}: no such audit log")
    result = check(log)
    if as_json:
        print_json({"ok": result.ok, "records": result.records, "problems": result.problems})
    elif result.ok:
        print(f"{log}: {result.records} records, chain intact")
    else:
        print(f"{log}: TAMPERED ({len(result.problems)} problems in {result.records} records)")
        for problem in result.problems:
            print(f"  {problem}")
    return 0 if result.ok else 1


def register(app: typer.Typer) -> None:
    """Attach the group to the root app."""
    app.add_typer(audit_app, name="audit")
