"""Sites that keep their own keys: a CSR made at the site, signed in the workspace, and the
kit completed at the site with its key.

:func:`request_certificate` (at the site) writes a key and a CSR; :func:`sign_csr` (project
admin) issues the certificate and builds the kit without a key; :func:`assemble_kit` (at the
site) adds the key, verifies the kit and moves it into place. Signing refuses a CSR whose
participant or key already has a live certificate in the workspace unless ``force``, so the
same request is never silently signed twice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedctl.errors import NotFound, UsageError
from fedctl.provision.he import workspace_context
from fedctl.provision.identity import Identity, IdentityError, identity_from_name
from fedctl.provision.kit import Kit, load_kit
from fedctl.provision.kitfiles import read_kit_folder, read_kit_zip, write_kit_dir
from fedctl.provision.kitspec import KEY_FILE, STARTUP, KitError, KitFile
from fedctl.provision.project import Admin, Participant, Project, Server, Site, validate_participant
from fedctl.provision.workspace import (
    CREATED,
    State,
    build_issue,
    open_workspace,
    save_state,
    write_issues,
)


@dataclass(frozen=True)
class CertRequest:
    """What :func:`request_certificate` wrote: the private key (0600) and the CSR to send."""

    identity: Identity
    key_path: Path
    csr_path: Path


def request_certificate(
    name: str,
    *,
    org: str,
    type: str = "site",
    role: str | None = None,
    out_dir: str | Path = ".",
    key_type: str = "ecdsa-p256",
) -> CertRequest:
    """Make a key and a CSR at the site; only the CSR (``<name>.csr``) leaves it.

    The key goes to ``<out_dir>/<name>.key`` (mode 0600) and is never overwritten.
    """
    from cryptography.hazmat.primitives import serialization

    from fedctl.provision import certs

    identity = _requested_identity(name, org, type, role)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    for p in (key_path, csr_path):
        if p.exists():
            raise UsageError(f"{p}: already exists; not overwriting (a private key may be in use)")
    key = certs.generate_key(key_type)
    csr = certs.create_csr(identity, key)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(certs.key_to_pem(key))
    os.chmod(key_path, 0o600)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return CertRequest(identity, key_path, csr_path)


def _requested_identity(name: str, org: str, type: str, role: str | None) -> Identity:
    if type == "site":
        if role is not None:
            raise UsageError(
                f"cannot request a certificate for site {name!r}: only admins have a role"
            )
        validate_participant(Site(name=name, org=org))
        return Identity(name=name, org=org, type="site")
    if type == "admin":
        if role is None:
            raise UsageError(f"cannot request a certificate for admin {name!r}: --role is required")
        validate_participant(Admin(name=name, org=org, role=role))
        return Identity(name=name, org=org, type="admin", role=role)
    if type == "server":
        if role is not None:
            raise UsageError("cannot request a certificate for the server: only admins have a role")
        Project(name="check", server=Server(name=name, org=org))  # validates name and org
        return Identity(name=name, org=org, type="server")
    raise UsageError(f"type must be site, admin or server, got {type!r}")


@dataclass(frozen=True)
class SignedRequest:
    """What :func:`sign_csr` produced: a kit without private key, to send back to the site."""

    identity: Identity
    kit_dir: Path
    zip_path: Path
    serial: str
    not_after: str
    added: bool


def sign_csr(
    workspace: str | Path, csr: str | Path | bytes, *, force: bool = False
) -> SignedRequest:
    """Issue a certificate for a site-held key and build that participant's kit without the key.

    The CSR's subject names the participant. If it is already in the project, name, org, type
    and role must agree; if not, it is added. A participant whose kit (with key) was built in
    this workspace is only switched to its own key with ``force``; a participant, or a key, that
    already has a live (unexpired) certificate is only signed again with ``force``, so signing
    the same CSR twice does not silently issue a second certificate. The result is
    ``kits/<name>/`` and ``kits/<name>.zip``; the site completes it with :func:`assemble_kit`.
    """
    from cryptography import x509

    state = open_workspace(workspace)
    source = str(csr) if not isinstance(csr, bytes) else "CSR"
    try:
        data = csr if isinstance(csr, bytes) else Path(csr).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{source}: no such file") from None
    try:
        request = x509.load_pem_x509_csr(data)
    except ValueError:
        raise UsageError(f"{source}: not a PEM certificate signing request") from None
    if not request.is_signature_valid:
        raise UsageError(f"{source}: the request's signature does not verify (corrupted CSR)")
    try:
        ident = identity_from_name(request.subject, what=source)
    except IdentityError as exc:
        raise UsageError(str(exc)) from None
    with state.lock():
        ca_key, ca_cert = state.ca()
        project = state.project()
        added = False
        participant: Participant | Server
        if ident.type == "server":
            if ident != project.server_identity:
                raise UsageError(
                    f"{source}: requests {ident}, but the project's server is "
                    f"{project.server_identity}"
                )
            participant = project.server
            existing: Identity | None = ident
        else:
            found = project.participant(ident.name)
            existing = found.identity if found else None
            if found is None:
                participant = (
                    Site(name=ident.name, org=ident.org)
                    if ident.type == "site"
                    else Admin(name=ident.name, org=ident.org, role=ident.role or "")
                )
                validate_participant(participant)
                project = project.with_participant(participant)
                added = True
            else:
                if found.identity != ident:
                    raise UsageError(
                        f"{source}: requests {ident}, but the project has {found.identity}; "
                        "fix the request or the project"
                    )
                participant = found
        rec = state.current().get(ident.name.casefold())
        if existing and rec and rec.get("key") == "workspace" and not force:
            raise UsageError(
                f"{ident.type} {ident.name!r} already has a kit with a key made in this workspace; "
                "pass --force to issue a certificate for the site's own key instead"
            )
        if not force:
            _refuse_second_certificate(state, ident, request.public_key(), source)
        he, _ = workspace_context(state.dir, project.homomorphic_encryption)
        issue = build_issue(
            project,
            participant,
            ca_key,
            ca_cert,
            public_key=request.public_key(),
            status=CREATED,
            he=he,
        )
        records = write_issues(state, [issue], replace=True)
        save_state(state, project, [issue.record])
    rec_out = records[0]
    assert rec_out.kit_dir is not None and rec_out.zip_path is not None
    return SignedRequest(
        ident,
        rec_out.kit_dir,
        rec_out.zip_path,
        issue.record["serial"],
        issue.record["not_after"],
        added,
    )


def _refuse_second_certificate(
    state: State, ident: Identity, public_key: object, source: str
) -> None:
    """Refuse to sign for a participant, or a key, that already has a live certificate."""
    from fedctl.provision import certs

    live = state.live_certificates(certs.utcnow())
    for rec in reversed(live):
        if rec["name"].casefold() == ident.name.casefold():
            raise UsageError(
                f"{ident.type} {ident.name!r} already has a live certificate (serial "
                f"{rec['serial']}, valid until {rec['not_after'][:10]}); pass --force to issue "
                "another"
            )
    key = certs.public_key_bytes(public_key)  # type: ignore[arg-type]
    for rec in reversed(live):
        if state.issued_public_key(rec["serial"]) == key:
            raise UsageError(
                f"{source}: its key already has a live certificate for {rec['type']} "
                f"{rec['name']!r} (serial {rec['serial']}); pass --force to issue another"
            )


def assemble_kit(
    bundle: str | Path,
    *,
    key: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> Kit:
    """Unpack a kit (zip or folder), add the site's own key if given, verify, and move into place.

    With ``key`` (the CSR flow) the bundle must not hold a key; the key file is copied to
    ``startup/key.pem`` (0600) and must match the certificate. Without it the bundle must be a
    complete kit (this also unpacks a provisioned ``<name>.zip`` with its file modes intact).
    ``out_dir`` defaults to ``./<name>``; an existing folder is never overwritten.
    """
    src = Path(bundle)
    if not src.exists():
        raise NotFound(f"{src}: no such file or folder")
    if src.is_dir():
        top, files = src.name, read_kit_folder(src)
    else:
        top, files = read_kit_zip(src)
    dest = Path(out_dir) if out_dir is not None else Path.cwd() / top
    if dest.exists():
        raise UsageError(f"{dest}: already exists; not overwriting a kit")
    has_key = any(f.path == f"{STARTUP}/{KEY_FILE}" for f in files)
    if key is not None:
        if has_key:
            raise UsageError(f"{src}: already contains a private key; do not pass --key")
        try:
            key_bytes = Path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key}: no such key file") from None
        files = [*files, KitFile(f"{STARTUP}/{KEY_FILE}", key_bytes, 0o600)]
    elif not has_key:
        raise UsageError(
            f"{src}: has no private key (a kit signed from a CSR); pass --key with the key made "
            "by `fedctl cert request`"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.rmdir()
    try:
        write_kit_dir(files, tmp)
        try:
            load_kit(tmp)
        except KitError as exc:
            msg = str(exc).replace(str(tmp), str(dest))
            if key is not None and "does not match" in msg:
                msg = f"{key}: does not match the certificate in {src} (signed for another key)"
            raise KitError(msg) from None
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_kit(dest)


__all__ = ["CertRequest", "SignedRequest", "assemble_kit", "request_certificate", "sign_csr"]
