"""``fedctl audit verify LOG`` and ``fedctl audit head LOG``: check and anchor an audit trail."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedctl.cli.common import JSON_OPTION, failure, print_json

audit_app = typer.Typer(help="Audit trails of servers and sites.", no_args_is_help=True)

LOG_ARG = typer.Argument(..., help="An audit.jsonl (e.g. KIT/workspace/audit.jsonl).")


@audit_app.command("verify")
def verify(
    log: Path = LOG_ARG,
    cert: Path | None = typer.Option(
        None, "--cert", help="The participant's certificate: the head must be signed with its key."
    ),
    kit: Path | None = typer.Option(
        None, "--kit", help="The participant's startup kit (its certificate is used)."
    ),
    anchor: Path | None = typer.Option(
        None,
        "--anchor",
        help="Heads kept elsewhere (`fedctl audit head` lines): the trail must still hold them.",
    ),
    as_json: bool = JSON_OPTION,
) -> int:
    """Exit 0 if every record is intact and in order (and the head is signed, with a
    certificate; by default the kit's own for KIT/workspace/audit.jsonl); 1 and the problems
    otherwise."""
    from fedctl.errors import NotFound, UsageError
    from fedctl.runtime import audit

    if cert is not None and kit is not None:
        raise UsageError("give --cert or --kit, not both")
    if not log.is_file():
        raise NotFound(f"{log}: no such audit log")
    for what, path in (("certificate file", cert), ("startup kit", kit), ("anchor file", anchor)):
        if path is not None and not path.exists():
            raise NotFound(f"{path}: no such {what}")
    cert_path = cert
    if kit is not None:
        cert_path = audit.kit_certificate(kit)
    elif cert is None:
        cert_path = audit.default_certificate(log)
    certificate = audit.load_certificate(cert_path) if cert_path is not None else None
    anchors = audit.read_anchors(anchor) if anchor is not None else []
    result = audit.verify(log, cert=certificate, anchors=anchors)
    why = None if result.ok else f"{log}: tampered ({'; '.join(result.problems)})"
    if as_json:
        print_json({**result.to_dict(), "cert": str(cert_path) if cert_path else None})
        return 0 if why is None else failure(why)
    if result.ok:
        print(f"{log}: {result.records} records, chain intact")
    else:
        print(f"{log}: TAMPERED ({len(result.problems)} problems in {result.records} records)")
        for problem in result.problems:
            print(f"  {problem}")
        failure(why or "")
    if result.head == "verified":
        print(f"  head signed with the key of {cert_path}")
    elif result.head == "unverified" and result.head_record is not None:
        print("  head unverified: give --cert or --kit to check its signature")
    if result.anchors:
        print(f"  {result.anchors} anchor(s) checked")
    return 0 if result.ok else 1


@audit_app.command("head")
def head(log: Path = LOG_ARG, as_json: bool = JSON_OPTION) -> int:
    """Print the trail's (signed) head as one JSON line, to keep on another machine: later,
    `fedctl audit verify LOG --anchor FILE` checks that the trail up to it was not rewritten.
    With --json, the head is the envelope's result."""
    from fedctl.errors import CodecError, FedctlError, NotFound
    from fedctl.runtime import audit

    if not log.is_file():
        raise NotFound(f"{log}: no such audit log")
    try:
        current = audit.read_head(log)
    except CodecError as exc:
        raise FedctlError(f"{audit.head_path(log)}: unreadable ({exc})") from None
    if current is None:
        raise NotFound(f"{audit.head_path(log)}: no such audit head")
    cert_path = audit.default_certificate(log)
    certificate = audit.load_certificate(cert_path) if cert_path is not None else None
    result = audit.verify(log, cert=certificate)
    if not result.ok:
        raise FedctlError(
            f"{log}: the trail does not verify ({result.problems[0]}); "
            "run `fedctl audit verify` before anchoring it"
        )
    if as_json:
        print_json(current)
    else:
        print(json.dumps(current, sort_keys=True, separators=(",", ":")))
    return 0


def register(app: typer.Typer) -> None:
    """Attach the group to the root app."""
    app.add_typer(audit_app, name="audit")
