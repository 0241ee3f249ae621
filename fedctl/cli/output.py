"""What commands print for machines: one JSON envelope per command, success and error alike.

Under ``--json`` a command prints exactly one JSON document on stdout::

    {"ok": true,  "command": "job status", "result": {...},  "error": null}
    {"ok": false, "command": "simulate",   "result": {...} or null,
     "error": {"code": 1, "kind": "failed", "message": "...", "hint": null}}

``ok`` is true exactly when the exit code is 0; ``error.code`` is the exit code and
``error.kind`` its name (:data:`KINDS`). Commands hand their result to :func:`print_json` and,
when they end with a non-zero code without raising, say why with :func:`failure`;
:func:`fedctl.cli.main.main` prints the envelope once the command is over (or has failed to
parse). Outside ``main`` (a command function called directly) :func:`print_json` prints the
envelope at once.
"""

from __future__ import annotations

import json
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

#: exit code → ``error.kind`` (README, "Exit codes")
KINDS = {1: "failed", 2: "usage", 3: "denied", 4: "not_found", 130: "interrupted"}


@dataclass
class Session:
    """One command invocation: whether it prints JSON, its result and why it failed."""

    json: bool = False
    command: str = ""
    result: Any = None
    message: str | None = None


_session: ContextVar[Session | None] = ContextVar("fedctl_cli_session", default=None)


def begin(session: Session) -> Any:
    """Make ``session`` the current one; returns the token for :func:`end`."""
    return _session.set(session)


def end(token: Any) -> None:
    _session.reset(token)


def current() -> Session | None:
    return _session.get()


def envelope(
    command: str,
    code: int,
    result: Any = None,
    message: str | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The JSON document for a command that ended with exit ``code``."""
    error = None
    if code != 0:
        who = f"fedctl {command}".strip()
        error = {
            "code": code,
            "kind": KINDS.get(code, "failed"),
            "message": message or f"{who} exited with code {code}",
            "hint": hint,
        }
    return {"ok": code == 0, "command": command, "result": result, "error": error}


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, default=str)


def print_json(data: Any) -> None:
    """A command's result for ``--json`` (printed in the envelope when the command ends)."""
    session = _session.get()
    if session is None:
        print(dumps(envelope("", 0, data)))
        return
    session.result = data


def failure(message: str, code: int = 1) -> int:
    """Record why a command ends with ``code`` (the envelope's ``error.message``); returns it."""
    session = _session.get()
    if session is not None:
        session.message = message
    return code


def print_envelope(
    session: Session, code: int, message: str | None = None, hint: str | None = None
) -> None:
    """Print the envelope of ``session`` ending with ``code`` on stdout."""
    doc = envelope(session.command, code, session.result, message or session.message, hint)
    sys.stdout.write(dumps(doc) + "\n")
    sys.stdout.flush()
