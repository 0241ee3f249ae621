"""A provisioning workspace on disk: its layout, its state, and issuing certificates into it.

Layout::

    WORKSPACE/
      state/                 private to the project admin (mode 0700); never handed out
        ca.key               the CA private key (0600)
        ca.pem               the CA certificate
        project.yml          the project as provisioned, including participants added later
        issued.json          every certificate issued (serial, fingerprint, validity, key origin)
        issued/<serial>.pem  copies of those certificates (for audit and future revocation)
        he_context.secret    the project's CKKS context with its secret key (0600), and
        he_context.public    its public form: only with homomorphic_encryption in project.yml
        .lock                one provisioning at a time
      kits/
        <name>/              one startup kit per participant (see fedctl.provision.kit)
        <name>.zip           the same kit, ready to hand over (0600 when it holds a key)

:class:`State` reads and locks it; :func:`build_issue` makes one participant's certificate and
kit in memory and :func:`write_issues` / :func:`save_state` put them in place. Used by
:mod:`fedctl.provision.provisioner` and :mod:`fedctl.provision.csr`; not a public API.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl._fs import atomic_write, write_json_atomic
from fedctl.errors import ConfigError, NotFound, UsageError
from fedctl.provision.identity import Identity
from fedctl.provision.kitfiles import atomic_write_dir, atomic_write_zip, build_kit_files
from fedctl.provision.kitspec import KitFile
from fedctl.provision.project import Participant, Project, Server, Site, load_project

if TYPE_CHECKING:
    from cryptography import x509

    from fedctl.provision.certs import PrivateKey
    from fedctl.provision.he import HEMaterial

STATE, KITS = "state", "kits"
CA_KEY, CA_CERT, PROJECT_FILE, ISSUED_FILE, ISSUED_DIR = (
    "ca.key",
    "ca.pem",
    "project.yml",
    "issued.json",
    "issued",
)

#: how issued.json writes times (UTC)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

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


# --------------------------------------------------------------------------- workspace state


class State:
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

    def live_certificates(self, now: dt.datetime) -> list[dict[str, Any]]:
        """Issued records whose certificate has not expired at ``now``, oldest first."""
        return [
            rec
            for rec in self.issued()["certificates"]
            if _parse_time(rec.get("not_after", "")) > now
        ]

    def issued_public_key(self, serial: str) -> bytes | None:
        """The public key (DER) of issued certificate ``serial``; None if its copy is gone."""
        from fedctl.provision import certs

        try:
            cert = certs.load_cert((self.dir / ISSUED_DIR / f"{serial}.pem").read_bytes())
        except (OSError, ValueError):
            return None
        return certs.public_key_bytes(cert.public_key())  # type: ignore[arg-type]

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


def open_workspace(workspace: str | Path) -> State:
    """The state of an existing workspace; NotFound/UsageError if there is none."""
    state = State(Path(workspace))
    if not state.is_workspace():
        if not state.root.exists():
            raise NotFound(f"{state.root}: no such workspace (run `fedctl provision` first)")
        raise UsageError(f"{state.root}: not a fedctl workspace (no state/ca.pem)")
    return state


def _parse_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=dt.timezone.utc)  # noqa: UP017
    except (TypeError, ValueError):
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)  # noqa: UP017


def issued_record(identity: Identity, cert: x509.Certificate, key_origin: str) -> dict[str, Any]:
    """The issued.json entry for a certificate; ``key_origin`` is "workspace" or "site"."""
    from fedctl.provision.certs import fingerprint, utcnow

    return {
        **identity.to_dict(),
        "serial": format(cert.serial_number, "x"),
        "sha256": fingerprint(cert),
        "not_before": cert.not_valid_before_utc.strftime(TIME_FORMAT),
        "not_after": cert.not_valid_after_utc.strftime(TIME_FORMAT),
        "issued_at": utcnow().strftime(TIME_FORMAT),
        "key": key_origin,
    }


@dataclass
class Issue:
    """A kit built in memory, waiting to be written."""

    identity: Identity
    files: list[KitFile]
    record: dict[str, Any]
    cert_pem: bytes
    status: str
    note: str = ""


def build_issue(
    project: Project,
    participant: Participant | Server,
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    *,
    public_key: Any = None,
    status: str = CREATED,
    he: HEMaterial | None = None,
) -> Issue:
    """Key (unless ``public_key`` comes from a CSR), certificate and kit files for a participant;
    ``he`` is the project's HE context (:func:`fedctl.provision.he.workspace_context`)."""
    from fedctl.provision import certs

    if isinstance(participant, Server):
        identity = project.server_identity
        host_names = server_host_names(project.server)
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
        he_file=he.kit_file(identity.type) if he is not None else None,
    )
    record = issued_record(identity, cert, "workspace" if key_pem else "site")
    return Issue(identity, files, record, certs.cert_to_pem(cert), status)


def server_host_names(server: Server) -> list[str]:
    """Every name the server certificate covers: ``server.name`` first."""
    return [server.name, *server.host_names]


def write_issues(state: State, issues: list[Issue], *, replace: bool) -> list[KitRecord]:
    """Put each kit (folder and zip) and a copy of its certificate in place, atomically."""
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


def save_state(state: State, project: Project, new_records: list[dict[str, Any]]) -> None:
    """Append ``new_records`` to issued.json and record the project as provisioned."""
    issued = state.issued()
    issued["certificates"].extend(new_records)
    write_json_atomic(state.dir / ISSUED_FILE, issued)
    header = (
        "# The project as provisioned in this workspace (kept by fedctl; participants added\n"
        "# with --add-site/--add-admin or `fedctl cert sign` are included).\n"
    )
    atomic_write(state.dir / PROJECT_FILE, (header + project.to_yaml()).encode())
