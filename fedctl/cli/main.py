"""Root of the ``fedctl`` command line.

Every command module is imported here, so none of them may import torch, ray or grpc at module
level: ``fedctl --help`` must stay fast. Heavy work is imported inside the command functions.

:func:`main` is the one place where a command's outcome becomes an exit code and, under
``--json``, the JSON envelope (:mod:`fedctl.cli.output`): fedctl errors, usage errors of the
parser (click's, or the copy of click that typer ≥ 0.22 bundles), Ctrl-C. Exit codes:
0 success, 1 a job or check failed, 2 bad input or usage, 3 permission denied, 4 something named
does not exist, 130 interrupted. ``fedctl`` alone, or a command group alone (``fedctl job``),
prints its help on stdout and exits 0.
"""

from __future__ import annotations

import sys
import traceback
from functools import cache
from typing import Any

import typer

from fedctl import __version__
from fedctl.cli import audit as _audit
from fedctl.cli import he as _he
from fedctl.cli import jobs as _jobs
from fedctl.cli import output
from fedctl.cli import poc as _poc
from fedctl.cli import provision as _provision
from fedctl.cli import recipe as _recipe
from fedctl.cli import report as _report
from fedctl.cli import runtime as _runtime
from fedctl.cli import simulate as _simulate
from fedctl.cli.common import APP_SETTINGS

PROG = "fedctl"

app = typer.Typer(
    name=PROG,
    help="Federated learning for PyTorch: one recipe from simulation to POC to production.",
    **APP_SETTINGS,
)


def _version(value: bool) -> None:
    if value:
        print(f"fedctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Federated learning for PyTorch: one recipe from simulation to POC to production."""


_simulate.register(app)
_provision.register(app)
_recipe.register(app)
_poc.register(app)
_runtime.register(app)
_jobs.register(app)
_audit.register(app)
_report.register(app)
_he.register(app)


@cache
def command() -> Any:
    """The click command tree of the app (built once), with plain-text help.

    Help is plain text (``rich_markup_mode=None``: no ``<bool>`` after flags as typer 0.29's rich
    help prints, stable in logs and pipes). typer < 0.22 still escapes ``[`` in plain help
    whenever rich is installed (``\\[required]``); telling typer that rich is absent gives the
    same plain help with every typer version."""
    import typer.core

    if hasattr(typer.core, "HAS_RICH"):
        typer.core.HAS_RICH = False
    return typer.main.get_command(app)


@cache
def _parser_errors() -> dict[str, tuple[type[BaseException], ...]]:
    """The exception classes of the parser: typer ≥ 0.22 raises those of its bundled copy of
    click (``typer._click``), older typer those of click itself; both are caught."""
    import importlib

    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue

    def classes(attr: str, *extra: type[BaseException]) -> tuple[type[BaseException], ...]:
        found = [getattr(m, attr) for m in modules if hasattr(m, attr)]
        return tuple(dict.fromkeys([*found, *extra]))

    return {
        "usage": classes("UsageError"),
        "click": classes("ClickException"),
        "exit": classes("Exit", typer.Exit),
        "abort": classes("Abort", typer.Abort),
    }


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for JSON (``--json`` before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def command_path(argv: list[str]) -> str:
    """The (sub)command ``argv`` names, e.g. ``job status``, as far as it names one."""
    node = command()
    names: list[str] = []
    for arg in argv:
        commands = getattr(node, "commands", None)
        if arg.startswith("-") or not commands or arg not in commands:
            break
        node = commands[arg]
        names.append(arg)
    return " ".join(names)


def _context_for(argv: list[str]) -> Any:
    """A parser context for the (sub)command ``argv`` names, to show its usage line."""
    node = command()
    ctx = node.context_class(node, info_name=PROG)
    for name in command_path(argv).split():
        node = node.commands[name]
        ctx = node.context_class(node, info_name=name, parent=ctx)
    return ctx


def _usage_hint(exc: BaseException, argv: list[str]) -> str | None:
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        try:
            ctx = _context_for(argv)
        except Exception:  # only a hint: never hide the error itself behind it
            return None
    usage = " ".join(ctx.get_usage().split())  # "Usage: fedctl simulate [OPTIONS] RECIPE"
    usage = usage[:1].lower() + usage[1:]
    return f"{usage} (more: {ctx.command_path} --help)"


def _one_line(message: str) -> str:
    """The parser's message on one line, each sentence once (typer 0.20 with click ≥ 8.2 says
    "Did you mean 'simulate'?" twice)."""
    import re

    sentences = re.split(r"(?<=[.?!])\s+", " ".join(message.split()))
    return " ".join(dict.fromkeys(s for s in sentences if s))


def _fail(message: str, hint: str | None = None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)


def _run(argv: list[str], session: output.Session) -> tuple[int, str | None, str | None]:
    """Run the command; (exit code, error message, hint)."""
    from fedctl.errors import FedctlError

    errors = _parser_errors()
    try:
        rv = command().main(args=argv, prog_name=PROG, standalone_mode=False)
    except FedctlError as exc:
        hint = getattr(exc, "hint", None)
        _fail(str(exc), hint)
        return exc.exit_code, str(exc), hint
    except errors["usage"] as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            # `fedctl` or a command group alone: its help, on stdout, exit 0
            print(ctx.get_help())
            return 0, None, None
        message = _one_line(exc.format_message())  # type: ignore[attr-defined]
        hint = _usage_hint(exc, argv)
        _fail(message, hint)
        return 2, message, hint
    except errors["click"] as exc:
        message = exc.format_message()  # type: ignore[attr-defined]
        _fail(message)
        return int(getattr(exc, "exit_code", 1)), message, None
    except errors["exit"] as exc:
        return int(getattr(exc, "exit_code", 0) or 0), None, None
    except errors["abort"]:  # click turns Ctrl-C (and EOF at a prompt) into Abort
        _fail("interrupted")
        return 130, "interrupted", None
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130, "interrupted", None
    except Exception as exc:
        if not session.json:
            raise
        traceback.print_exc()
        return 1, f"internal error: {type(exc).__name__}: {exc}", None
    if isinstance(rv, bool) or not isinstance(rv, int):
        return 0, None, None
    if rv and session.message:  # a command that ends non-zero says why, like an error would
        _fail(session.message)
    return rv, session.message if rv else None, None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    session = output.Session(json=wants_json(args), command=command_path(args))
    token = output.begin(session)
    try:
        code, message, hint = _run(args, session)
    finally:
        output.end(token)
    if session.json:
        output.print_envelope(session, code, message, hint)
    return code


if __name__ == "__main__":
    sys.exit(main())
