"""Root of the ``fedctl`` command line.

Every command module is imported here, so none of them may import torch, ray or grpc at module
level: ``fedctl --help`` must stay fast. Heavy work is imported inside the command functions.
"""

from __future__ import annotations

import sys

import typer

from fedctl import __version__
from fedctl.cli import audit as _audit
from fedctl.cli import jobs as _jobs
from fedctl.cli import poc as _poc
from fedctl.cli import provision as _provision
from fedctl.cli import recipe as _recipe
from fedctl.cli import report as _report
from fedctl.cli import runtime as _runtime
from fedctl.cli import simulate as _simulate

app = typer.Typer(
    name="fedctl",
    help="Federated learning for PyTorch: one recipe from simulation to POC to production.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn fedctl errors into one line on stderr and their exit code."""
    from fedctl.errors import FedctlError

    try:
        rv = app(args=argv, standalone_mode=False)
    except FedctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # click usage errors and friends
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
