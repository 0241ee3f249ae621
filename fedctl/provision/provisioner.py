"""Provisioning a workspace: the CA, every participant's certificate and kit, and growth.

:func:`provision` builds a new workspace (layout in :mod:`fedctl.provision.workspace`) or
brings an existing one up to date with a project; :func:`add_site` / :func:`add_admin` grow it
by one participant. A first run builds the whole workspace in a temporary sibling folder and
renames it into place, so a failure leaves nothing behind. Later runs reuse the CA and leave
existing kits untouched unless ``force``; each new or rebuilt kit is written aside and renamed
into place. Sites that keep their own keys are handled in :mod:`fedctl.provision.csr` (its
names are re-exported here for older imports).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedctl._fs import atomic_write
from fedctl.errors import NotFound, UsageError
from fedctl.provision import he as he_context
from fedctl.provision.csr import (
    CertRequest,
    SignedRequest,
    assemble_kit,
    request_certificate,
    sign_csr,
)
from fedctl.provision.identity import Identity
from fedctl.provision.kitfiles import kit_config
from fedctl.provision.kitspec import CERT_FILE, CONFIG_FILE, STARTUP
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
from fedctl.provision.workspace import (
    CA_CERT,
    CA_KEY,
    CREATED,
    ISSUED_DIR,
    ISSUED_FILE,
    KITS,
    PROJECT_FILE,
    REBUILT,
    SITE_KEY,
    STALE,
    STATE,
    UNCHANGED,
    Issue,
    KitRecord,
    State,
    build_issue,
    open_workspace,
    save_state,
    server_host_names,
    write_issues,
)


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
    state = State(root)
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
        state = State(tmp)
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
        he, _ = he_context.workspace_context(state.dir, project.homomorphic_encryption)
        issues = [build_issue(project, project.server, ca_key, ca_cert, he=he)]
        issues += [build_issue(project, p, ca_key, ca_cert, he=he) for p in project.participants]
        write_issues(state, issues, replace=False)
        save_state(state, project, [i.record for i in issues])
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
    final = State(root)
    kits = [
        KitRecord(
            i.identity, CREATED, final.kits / i.identity.name, final.kits / f"{i.identity.name}.zip"
        )
        for i in issues
    ]
    return ProvisionResult(root, project, final.dir / CA_CERT, True, kits, [])


def _stale_reason(
    state: State, project: Project, p: Participant | Server, he: he_context.HEMaterial | None
) -> str:
    """Why an existing kit no longer matches the project ('' if it does)."""
    from fedctl.provision import certs

    labels: Mapping[str, str] = {}
    if isinstance(p, Server):
        identity = project.server_identity
    else:
        identity = p.identity
        labels = p.labels if isinstance(p, Site) else {}
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
            cert = certs.load_cert((kit_dir / STARTUP / CERT_FILE).read_bytes())
            if set(certs.cert_host_names(cert)) != set(server_host_names(p)):
                reasons.append("server host names")
        except (OSError, ValueError):
            reasons.append("certificate")
    he_reason = he_context.stale_reason(kit_dir, identity.type, he)
    if he_reason:
        reasons.append(he_reason)
    return ", ".join(reasons)


def _reprovision(project: Project, state: State, *, force: bool) -> ProvisionResult:
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
    for old in kept:
        warnings.append(
            f"{old.type} {old.name!r} is in the workspace but not in the project file; its kit is "
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
        homomorphic_encryption=project.homomorphic_encryption,
    )
    he, he_warning = he_context.workspace_context(state.dir, merged.homomorphic_encryption)
    if he_warning:
        warnings.append(he_warning)
    if project.ca_valid_days != stored.ca_valid_days:
        warnings.append(
            "ca_valid_days changed: the existing CA keeps its lifetime "
            f"(valid until {ca_cert.not_valid_after_utc:%Y-%m-%d})"
        )
    current = state.current()
    issues: list[Issue] = []
    records: list[KitRecord] = []
    everyone: list[Server | Site | Admin] = [merged.server, *merged.participants]
    for p in everyone:
        ident = merged.server_identity if isinstance(p, Server) else p.identity
        rec = current.get(ident.name.casefold())
        kit_dir = state.kits / ident.name
        zip_path = state.kits / f"{ident.name}.zip"
        if rec and rec.get("key") == "site":
            stale = _stale_reason(state, merged, p, he) if kit_dir.is_dir() else ""
            note = "keeps its own key; sign a new CSR with `fedctl cert sign --force` to change it"
            if stale:
                note = f"out of date ({stale}); " + note
            records.append(
                KitRecord(ident, SITE_KEY, kit_dir if kit_dir.is_dir() else None, None, note)
            )
            continue
        if rec is None or not kit_dir.is_dir():
            issues.append(build_issue(merged, p, ca_key, ca_cert, status=CREATED, he=he))
        elif force:
            issues.append(build_issue(merged, p, ca_key, ca_cert, status=REBUILT, he=he))
        else:
            stale = _stale_reason(state, merged, p, he)
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
        records += write_issues(state, issues, replace=True)
    if issues or merged.to_dict() != stored.to_dict():
        save_state(state, merged, [i.record for i in issues])
    order = {i.name.casefold(): n for n, i in enumerate(merged.identities())}
    records.sort(key=lambda r: order.get(r.name.casefold(), 1 << 30))
    return ProvisionResult(state.root, merged, state.dir / CA_CERT, False, records, warnings)


# --------------------------------------------------------------------------- growth


def add_participant(workspace: str | Path, participant: Participant) -> ProvisionResult:
    """Add one site or admin to a provisioned workspace under the same CA and build its kit."""
    validate_participant(participant)
    state = open_workspace(workspace)
    with state.lock():
        ca_key, ca_cert = state.ca()
        project = state.project()
        _check_new_name(project, participant.identity)
        project = project.with_participant(participant)
        he, _ = he_context.workspace_context(state.dir, project.homomorphic_encryption)
        issue = build_issue(project, participant, ca_key, ca_cert, he=he)
        records = write_issues(state, [issue], replace=False)
        save_state(state, project, [issue.record])
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
    "CA_CERT",
    "CA_KEY",
    "CREATED",
    "ISSUED_DIR",
    "ISSUED_FILE",
    "KITS",
    "PROJECT_FILE",
    "REBUILT",
    "SITE_KEY",
    "STALE",
    "STATE",
    "UNCHANGED",
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
