"""Provisioning a workspace: the CA, every participant's certificate and kit, and growth.

Workspace layout::

    WORKSPACE/
      state/                 private to the project admin (mode 0700); never handed out
        ca.key               the CA private key (0600)
        ca.pem               the CA certificate
        project.yml          the project as provisioned, including participants added later
        issued.json          every certificate issued (serial, fingerprint, validity, key origin)
        issued/<serial>.pem  copies of those certificates (for audit and future revocation)
      kits/
        <name>/              one startup kit per participant (see fedctl.provision.kit)
        <name>.zip           the same kit, ready to hand over (0600 when it holds a key)

A first run builds the whole workspace in a temporary sibling folder and renames it into place,
so a failure leaves nothing behind. Later runs reuse the CA and leave existing kits untouched
unless ``force``; each new or rebuilt kit is written aside and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import atomic_write
from fedctl.errors import ConfigError, NotFound, UsageError
from fedctl.provision.identity import Identity, IdentityError
from fedctl.provision.kit import (
    CONFIG_FILE,
    STARTUP,
    Kit,
    KitError,
    KitFile,
    atomic_write_dir,
    atomic_write_zip,
    build_kit_files,
    kit_config,
    load_kit,
    read_kit_folder,
    read_kit_zip,
    write_kit_dir,
)
from fedctl.provision.project import (
    Admin,
    Participant,
    Project,
    ProjectError,
    Server,
    Site,
    load_project,
    validate_participant,
)

if TYPE_CHECKING:
    from cryptography import x509

    from fedctl.provision.certs import PrivateKey

STATE, KITS = "state", "kits"
CA_KEY, CA_CERT, PROJECT_FILE, ISSUED_FILE, ISSUED_DIR = (
    "ca.key",
    "ca.pem",
    "project.yml",
    "issued.json",
    "issued",
)

#: KitRecord.status values.
CREATED, REBUILT, UNCHANGED, STALE, SITE_KEY = (
    "created",
    "rebuilt",
    "unchanged",
    "stale",
    "site-key",
)


@dataclass(frozen=True)
class KitRecord:
    """What provisioning did for one participant."""

    identity: Identity
    status: str
    kit_dir: Path | None
    zip_path: Path | None
    note: str = ""

    @property
    def name(self) -> str:
        return self.identity.name

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.identity.to_dict(),
            "status": self.status,
            "kit_dir": str(self.kit_dir) if self.kit_dir else None,
            "zip": str(self.zip_path) if self.zip_path else None,
            "note": self.note,
        }


@dataclass(frozen=True)
class ProvisionResult:
    """The outcome of :func:`provision` or :func:`add_participant`."""

    workspace: Path
    project: Project
    ca_cert: Path
    ca_created: bool
    kits: list[KitRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def kit(self, name: str) -> KitRecord:
        """The record for ``name`` (case-insensitive); NotFound if there is none."""
        for k in self.kits:
            if k.name.casefold() == name.casefold():
                return k
        raise NotFound(f"no kit for {name!r} in {self.workspace}")

    def kit_dir(self, name: str) -> Path:
        """Path of ``name``'s kit folder in the workspace."""
        return self.workspace / KITS / self.kit(name).name

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "project": self.project.name,
            "ca_cert": str(self.ca_cert),
            "ca_created": self.ca_created,
            "kits": [k.to_dict() for k in self.kits],
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- workspace state


class _State:
    """The files under WORKSPACE/state and how to read and update them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / STATE
        self.kits = root / KITS

    def is_workspace(self) -> bool:
        return (self.dir / CA_CERT).is_file() and (self.dir / CA_KEY).is_file()

    def ca(self) -> tuple[PrivateKey, x509.Certificate]:
        from fedctl.provision import certs

        try:
            key = certs.load_key((self.dir / CA_KEY).read_bytes())
            cert = certs.load_cert((self.dir / CA_CERT).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.dir}: cannot load the project CA ({exc})") from None
        from fedctl.provision.certs import public_key_bytes

        if public_key_bytes(key.public_key()) != public_key_bytes(cert.public_key()):  # type: ignore[arg-type]
            raise ConfigError(f"{self.dir / CA_KEY}: does not match {self.dir / CA_CERT}")
        return key, cert

    def project(self) -> Project:
        return load_project(self.dir / PROJECT_FILE)

    def issued(self) -> dict[str, Any]:
        path = self.dir / ISSUED_FILE
        if not path.exists():
            return {"version": 1, "certificates": []}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None

    def current(self) -> dict[str, dict[str, Any]]:
        """Latest issued certificate per participant name (casefolded)."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.issued()["certificates"]:
            out[rec["name"].casefold()] = rec
        return out

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One provisioning at a time per workspace (advisory lock on state/.lock; POSIX only)."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; provision from one shell at a time
            yield
            return
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(
                    f"{self.root}: another fedctl provisioning is running on this workspace"
                ) from None
            yield
        finally:
            os.close(fd)


def _record(identity: Identity, cert: x509.Certificate, key_origin: str) -> dict[str, Any]:
    from fedctl.provision.certs import fingerprint, utcnow

    return {
        **identity.to_dict(),
        "serial": format(cert.serial_number, "x"),
        "sha256": fingerprint(cert),
        "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "issued_at": utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key": key_origin,
    }


@dataclass
class _Issue:
    """A kit built in memory, waiting to be written."""

    identity: Identity
    files: list[KitFile]
    record: dict[str, Any]
    cert_pem: bytes
    status: str
    note: str = ""


def _build(
    project: Project,
    participant: Participant | Server,
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    *,
    public_key: Any = None,
    status: str = CREATED,
) -> _Issue:
    """Key (unless ``public_key`` comes from a CSR), certificate and kit files for a participant."""
    from fedctl.provision import certs

    if isinstance(participant, Server):
        identity = project.server_identity
        host_names = _server_host_names(project.server)
        labels: Mapping[str, str] = {}
        resources: Mapping[str, Any] = {}
    else:
        identity = participant.identity
        host_names = []
        labels = participant.labels if isinstance(participant, Site) else {}
        resources = participant.resources if isinstance(participant, Site) else {}
    key_pem = None
    if public_key is None:
        key = certs.generate_key(project.key_type)
        public_key = key.public_key()
        key_pem = certs.key_to_pem(key)
    cert = certs.issue_certificate(
        ca_key,
        ca_cert,
        identity,
        public_key,
        valid_days=project.cert_valid_days,
        host_names=host_names,
    )
    files = build_kit_files(
        project,
        identity,
        cert,
        ca_cert,
        ca_key,
        key_pem=key_pem,
        labels=labels,
        resources=resources,
    )
    record = _record(identity, cert, "workspace" if key_pem else "site")
    return _Issue(identity, files, record, certs.cert_to_pem(cert), status)


def _server_host_names(server: Server) -> list[str]:
    return [server.name, *server.host_names]


def _write_issues(state: _State, issues: list[_Issue], *, replace: bool) -> list[KitRecord]:
    from fedctl.provision.certs import load_cert

    records = []
    (state.dir / ISSUED_DIR).mkdir(exist_ok=True)
    for it in issues:
        name = it.identity.name
        dest = state.kits / name
        atomic_write_dir(it.files, dest, replace=replace)
        zip_path = state.kits / f"{name}.zip"
        atomic_write_zip(it.files, name, zip_path)
        serial = format(load_cert(it.cert_pem).serial_number, "x")
        atomic_write(state.dir / ISSUED_DIR / f"{serial}.pem", it.cert_pem)
        records.append(KitRecord(it.identity, it.status, dest, zip_path, it.note))
    return records


def _save_state(state: _State, project: Project, new_records: list[dict[str, Any]]) -> None:
    issued = state.issued()
    issued["certificates"].extend(new_records)
    atomic_write(
        state.dir / ISSUED_FILE, (json.dumps(issued, indent=2) + "\n").encode(), mode=0o644
    )
    header = (
        "# The project as provisioned in this workspace (kept by fedctl; participants added\n"
        "# with --add-site/--add-admin or `fedctl cert sign` are included).\n"
    )
    atomic_write(state.dir / PROJECT_FILE, (header + project.to_yaml()).encode())


# --------------------------------------------------------------------------- provision


def provision(
    project: Project | str | Path,
    workspace: str | Path,
    *,
    force: bool = False,
) -> ProvisionResult:
    """Create or update a workspace: the CA, and a kit (folder + zip) per participant.

    A new workspace gets a new CA. An existing one keeps its CA; participants that already have
    a kit keep it (reported ``unchanged``, or ``stale`` when the project changed something in
    it) unless ``force``, which re-issues every kit the workspace holds the key for. A site that
    keeps its own key (``fedctl cert sign``) is never re-keyed here. Participants in the
    workspace but no longer in ``project`` are kept (certificates cannot be revoked yet).
    """
    if not isinstance(project, Project):
        project = load_project(project)
    root = Path(workspace)
    state = _State(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: exists and is not a folder")
    if root.exists() and any(root.iterdir()):
        if not state.is_workspace():
            raise UsageError(
                f"{root}: exists and is not a fedctl workspace (no state/ca.pem); "
                "choose a new or empty folder"
            )
        with state.lock():
            return _reprovision(project, state, force=force)
    return _provision_new(project, root)


def _provision_new(project: Project, root: Path) -> ProvisionResult:
    from fedctl.provision import certs

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        state = _State(tmp)
        state.dir.mkdir(mode=0o700)
        state.kits.mkdir()
        ca_key, ca_cert = certs.create_ca(
            project.name,
            project.server_identity.org,
            valid_days=project.ca_valid_days,
            key_type=project.key_type,
        )
        atomic_write(state.dir / CA_KEY, certs.key_to_pem(ca_key), mode=0o600)
        atomic_write(state.dir / CA_CERT, certs.cert_to_pem(ca_cert))
        issues = [_build(project, project.server, ca_key, ca_cert)]
        issues += [_build(project, p, ca_key, ca_cert) for p in project.participants]
        _write_issues(state, issues, replace=False)
        _save_state(state, project, [i.record for i in issues])
        try:
            if root.exists():
                root.rmdir()  # an empty folder given by the user; replaced by the built one
            os.rename(tmp, root)
        except OSError:
            raise UsageError(
                f"{root}: was created or filled by someone else while provisioning; run again"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = _State(root)
    kits = [
        KitRecord(
            i.identity, CREATED, final.kits / i.identity.name, final.kits / f"{i.identity.name}.zip"
        )
        for i in issues
    ]
    return ProvisionResult(root, project, final.dir / CA_CERT, True, kits, [])


def _stale_reason(state: _State, project: Project, p: Participant | Server) -> str:
    """Why an existing kit no longer matches the project ('' if it does)."""
    from fedctl.provision import certs

    if isinstance(p, Server):
        identity, labels = project.server_identity, {}
    else:
        identity, labels = p.identity, (p.labels if isinstance(p, Site) else {})
    kit_dir = state.kits / identity.name
    try:
        have = json.loads((kit_dir / STARTUP / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its startup/kit.json is unreadable"
    want = kit_config(project, identity, labels)
    reasons = []
    if have.get("participant") != want["participant"]:
        reasons.append("participant details")
    if have.get("server") != want["server"] or have.get("listen") != want.get("listen"):
        reasons.append("server address")
    if have.get("labels") != want.get("labels"):
        reasons.append("labels")
    if isinstance(p, Server):
        try:
            cert = certs.load_cert((kit_dir / STARTUP / "cert.pem").read_bytes())
            if set(certs.cert_host_names(cert)) != set(_server_host_names(p)):
                reasons.append("server host names")
        except (OSError, ValueError):
            reasons.append("certificate")
    return ", ".join(reasons)


def _reprovision(project: Project, state: _State, *, force: bool) -> ProvisionResult:
    ca_key, ca_cert = state.ca()
    stored = state.project()
    if stored.name != project.name:
        raise UsageError(
            f"{state.root}: workspace belongs to project {stored.name!r}, not {project.name!r}; "
            "use another workspace folder"
        )
    warnings: list[str] = []
    # Participants provisioned earlier but missing from this project.yml stay in the project.
    kept = [p for p in stored.participants if project.participant(p.name) is None]
    for p in kept:
        warnings.append(
            f"{p.type} {p.name!r} is in the workspace but not in the project file; its kit is "
            "kept (certificates cannot be revoked yet)"
        )
    merged = Project(
        name=project.name,
        server=project.server,
        participants=(*project.participants, *kept),
        description=project.description,
        ca_valid_days=project.ca_valid_days,
        cert_valid_days=project.cert_valid_days,
        key_type=project.key_type,
        api_version=project.api_version,
    )
    if project.ca_valid_days != stored.ca_valid_days:
        warnings.append(
            "ca_valid_days changed: the existing CA keeps its lifetime "
            f"(valid until {ca_cert.not_valid_after_utc:%Y-%m-%d})"
        )
    current = state.current()
    issues: list[_Issue] = []
    records: list[KitRecord] = []
    for p in (merged.server, *merged.participants):
        ident = merged.server_identity if isinstance(p, Server) else p.identity
        rec = current.get(ident.name.casefold())
        kit_dir = state.kits / ident.name
        zip_path = state.kits / f"{ident.name}.zip"
        if rec and rec.get("key") == "site":
            stale = _stale_reason(state, merged, p) if kit_dir.is_dir() else ""
            note = "keeps its own key; re-sign its CSR with `fedctl cert sign` to change it"
            if stale:
                note = f"out of date ({stale}); " + note
            records.append(
                KitRecord(ident, SITE_KEY, kit_dir if kit_dir.is_dir() else None, None, note)
            )
            continue
        if rec is None or not kit_dir.is_dir():
            issues.append(_build(merged, p, ca_key, ca_cert, status=CREATED))
        elif force:
            issues.append(_build(merged, p, ca_key, ca_cert, status=REBUILT))
        else:
            stale = _stale_reason(state, merged, p)
            if stale:
                records.append(
                    KitRecord(
                        ident,
                        STALE,
                        kit_dir,
                        zip_path,
                        f"kit kept but out of date ({stale}); use --force to rebuild",
                    )
                )
            else:
                records.append(KitRecord(ident, UNCHANGED, kit_dir, zip_path))
    if issues:
        records += _write_issues(state, issues, replace=True)
    if issues or merged.to_dict() != stored.to_dict():
        _save_state(state, merged, [i.record for i in issues])
    order = {i.name.casefold(): n for n, i in enumerate(merged.identities())}
    records.sort(key=lambda r: order.get(r.name.casefold(), 1 << 30))
    return ProvisionResult(state.root, merged, state.dir / CA_CERT, False, records, warnings)


# --------------------------------------------------------------------------- growth


def _open_workspace(workspace: str | Path) -> _State:
    state = _State(Path(workspace))
    if not state.is_workspace():
        if not state.root.exists():
            raise NotFound(f"{state.root}: no such workspace (run `fedctl provision` first)")
        raise UsageError(f"{state.root}: not a fedctl workspace (no state/ca.pem)")
    return state


def add_participant(workspace: str | Path, participant: Participant) -> ProvisionResult:
    """Add one site or admin to a provisioned workspace under the same CA and build its kit."""
    validate_participant(participant)
    state = _open_workspace(workspace)
    with state.lock():
        ca_key, ca_cert = state.ca()
        project = state.project()
        _check_new_name(project, participant.identity)
        project = project.with_participant(participant)
        issue = _build(project, participant, ca_key, ca_cert)
        records = _write_issues(state, [issue], replace=False)
        _save_state(state, project, [issue.record])
    return ProvisionResult(state.root, project, state.dir / CA_CERT, False, records, [])


def _check_new_name(project: Project, identity: Identity) -> None:
    taken = project.participant(identity.name)
    if taken is not None or identity.name.casefold() == project.server.name.casefold():
        owner = f"{taken.type} {taken.name!r}" if taken else "the server"
        raise ProjectError(
            f"cannot add {identity.type} {identity.name!r}: the name is already used by "
            f"{owner} in project {project.name!r}"
        )


def add_site(
    workspace: str | Path,
    name: str,
    org: str,
    *,
    resources: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> ProvisionResult:
    """Add a site (see :func:`add_participant`)."""
    return add_participant(
        workspace,
        Site(name=name, org=org, resources=dict(resources or {}), labels=dict(labels or {})),
    )


def add_admin(workspace: str | Path, name: str, org: str, role: str) -> ProvisionResult:
    """Add an admin (see :func:`add_participant`)."""
    return add_participant(workspace, Admin(name=name, org=org, role=role))


# --------------------------------------------------------------------------- site-held keys


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
    this workspace is only switched to its own key with ``force``. The result is
    ``kits/<name>/`` and ``kits/<name>.zip``; the site completes it with :func:`assemble_kit`.
    """
    from cryptography import x509

    state = _open_workspace(workspace)
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
        from fedctl.provision.identity import identity_from_name

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
        issue = _build(
            project, participant, ca_key, ca_cert, public_key=request.public_key(), status=CREATED
        )
        records = _write_issues(state, [issue], replace=True)
        _save_state(state, project, [issue.record])
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
    from fedctl.provision.kit import KEY_FILE

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


# --------------------------------------------------------------------------- example


def example_project_yaml() -> str:
    """The commented example project (one server, three hospitals, two admins)."""
    from fedctl.provision.example import EXAMPLE_PROJECT_YAML

    return EXAMPLE_PROJECT_YAML


def write_example(path: str | Path, *, force: bool = False) -> Path:
    """Write the example project.yml to ``path`` (refusing to overwrite unless ``force``)."""
    p = Path(path)
    if p.exists() and not force:
        raise UsageError(f"{p}: already exists; not overwriting (use --force)")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(example_project_yaml(), encoding="utf-8")
    return p


__all__ = [
    "CertRequest",
    "KitRecord",
    "ProvisionResult",
    "SignedRequest",
    "add_admin",
    "add_participant",
    "add_site",
    "assemble_kit",
    "example_project_yaml",
    "provision",
    "request_certificate",
    "sign_csr",
    "write_example",
]
