"""Error types shared by every layer; each carries the exit code the CLI should use.

Messages are for people: one line saying what is wrong and where, never a traceback for a
problem in the user's input.
"""

from __future__ import annotations


class FedctlError(Exception):
    """Base class; ``exit_code`` is what ``fedctl`` exits with when this reaches the CLI."""

    exit_code = 1


class UsageError(FedctlError):
    """Bad input from the user: arguments, recipe files, project files, job folders."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe file or job folder that cannot be loaded or is not valid."""


class ConfigError(UsageError):
    """A configuration file (project.yml, policy file) that does not validate."""


class CodecError(FedctlError):
    """A malformed, oversized or hostile frame or file; nothing in it was executed."""


class RunFailed(FedctlError):
    """A job ran and failed (not enough results, a workflow error, a timeout)."""


class PermissionDenied(FedctlError):
    """An authenticated caller asked for something its role does not allow."""

    exit_code = 3


class NotFound(FedctlError):
    """A job, site or file that was named does not exist."""

    exit_code = 4


class ClientAPIError(FedctlError, RuntimeError):
    """A training script used ``fedctl.client`` the wrong way (e.g. receive before init)."""
