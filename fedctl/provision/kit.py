"""Startup kits: what is in one, how it is signed, written, zipped, unpacked and verified.

A kit is a folder named after its participant::

    <name>/
      README.txt        what this kit is and how to use it (not signed)
      startup/          identity and connection; signed by the project CA
        kit.json        project, participant, server host/port (JSON, see docs/provisioning.md)
        cert.pem        this participant's certificate
        key.pem         its private key (mode 0600; never in the manifest: it is checked
                        against cert.pem instead, so a site-held key fits the same scheme)
        rootCA.pem      the project CA certificate
        start.sh stop.sh  (server and sites)
        MANIFEST.json   SHA-256 of every other startup/ file, the CA's fingerprint
        MANIFEST.sig    the CA's signature over MANIFEST.json's exact bytes
      local/            the site's own policy (authorization, privacy, resources): not signed
      transfer/         empty; jobs and results pass through here

Verification refuses a kit whose signed files were changed, removed or added to, whose CA
is not the one the manifest was signed for, or whose key does not match its certificate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fedctl.errors import ConfigError
from fedctl.provision.identity import Identity, IdentityError

if TYPE_CHECKING:
    from cryptography import x509

    from fedctl.provision.certs import PrivateKey
    from fedctl.provision.project import Project

KIT_VERSION = 1
STARTUP, LOCAL, TRANSFER = "startup", "local", "transfer"
CONFIG_FILE = "kit.json"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "rootCA.pem"
MANIFEST_FILE = "MANIFEST.json"
SIGNATURE_FILE = "MANIFEST.sig"
#: startup/ files the manifest does not list (the key is checked against the certificate).
UNLISTED = frozenset({KEY_FILE, MANIFEST_FILE, SIGNATURE_FILE})
MAX_KIT_ZIP_BYTES = 16 << 20
MAX_KIT_ZIP_FILES = 1000


class KitError(ConfigError):
    """A kit that is incomplete, tampered with, foreign or otherwise unusable; names the file."""


@dataclass(frozen=True)
class KitFile:
    """One file of a kit to be written: path relative to the kit folder, bytes, POSIX mode."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Kit:
    """A loaded (and normally verified) kit: who it is for and where its pieces are."""

    root: Path
    project: str
    identity: Identity
    server_host: str
    server_port: int
    listen_host: str | None = None
    listen_port: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    not_after: dt.datetime | None = None

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def type(self) -> str:
        return self.identity.type

    @property
    def org(self) -> str:
        return self.identity.org

    @property
    def role(self) -> str | None:
        return self.identity.role

    @property
    def startup_dir(self) -> Path:
        return self.root / STARTUP

    @property
    def local_dir(self) -> Path:
        return self.root / LOCAL

    @property
    def transfer_dir(self) -> Path:
        return self.root / TRANSFER

    @property
    def cert_path(self) -> Path:
        return self.startup_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.startup_dir / KEY_FILE

    @property
    def ca_path(self) -> Path:
        return self.startup_dir / CA_FILE

    @property
    def server_address(self) -> str:
        """``host:port`` to connect to (IPv6 literals bracketed)."""
        return _hostport(self.server_host, self.server_port)

    @property
    def listen_address(self) -> str:
        """``host:port`` a server kit binds (server kits only)."""
        if self.listen_host is None or self.listen_port is None:
            raise KitError(f"{self.root}: a {self.type} kit has no listen address")
        return _hostport(self.listen_host, self.listen_port)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- building


def kit_config(
    project: Project, identity: Identity, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The startup/kit.json content for one participant."""
    cfg: dict[str, Any] = {
        "kit_version": KIT_VERSION,
        "project": project.name,
        "participant": identity.to_dict(),
        "server": {"host": project.server.name, "port": project.server.port},
    }
    if identity.type == "server":
        cfg["listen"] = {"host": project.server.listen_host, "port": project.server.port}
    if labels:
        cfg["labels"] = dict(labels)
    return cfg


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _script(identity: Identity, project: str, action: str) -> bytes:
    group = "server" if identity.type == "server" else "client"
    what = "server" if identity.type == "server" else f"site client for {identity.name!r}"
    verb = "Start" if action == "start" else "Stop"
    extra = (
        "# Runs in the foreground: use a service manager (systemd, supervisord) to keep it up.\n"
        if action == "start"
        else ""
    )
    return (
        "#!/bin/sh\n"
        f"# {verb} the fedctl {what} (project {project!r}) from this kit.\n"
        f"{extra}"
        "# Set FEDCTL to the fedctl executable if it is not on PATH.\n"
        "set -eu\n"
        'KIT=$(cd "$(dirname "$0")/.." && pwd)\n'
        f'exec "${{FEDCTL:-fedctl}}" {group} {action} --kit "$KIT" "$@"\n'
    ).encode()


def _readme(identity: Identity, project: str, server_address: str) -> bytes:
    head = f"fedctl startup kit for {identity} in project {project!r}.\n\n"
    if identity.type == "server":
        use = (
            "Start the server with startup/start.sh (it runs `fedctl server start --kit .`);\n"
            f"sites and admins connect to {server_address}.\n"
        )
    elif identity.type == "site":
        use = (
            "Start this site with startup/start.sh (it runs `fedctl client start --kit .`);\n"
            f"it connects to the server at {server_address}.\n"
        )
    else:
        use = (
            "This is an admin kit: pass it to admin commands, e.g.\n"
            "  fedctl submit job RECIPE --target prod --kit <this folder>\n"
            f"Commands connect to the server at {server_address}.\n"
        )
    return (
        head + use + "\n"
        "startup/  identity and connection, signed by the project CA. Do not edit: a changed,\n"
        "          missing or extra file makes fedctl refuse the kit. startup/key.pem is this\n"
        "          participant's private key: keep it secret (mode 0600).\n"
        "local/    this participant's own policy (authorization, privacy, resources):\n"
        "          edit freely.\n"
        "transfer/ working area for jobs and results.\n"
        "\n"
        "Check the kit with: fedctl kit verify <this folder>\n"
    ).encode()


def build_kit_files(
    project: Project,
    identity: Identity,
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    key_pem: bytes | None,
    labels: Mapping[str, str] | None = None,
    resources: Mapping[str, Any] | None = None,
) -> list[KitFile]:
    """Every file of one kit, with the manifest signed by the CA key.

    ``key_pem`` is None for a kit whose key stays at the site (the CSR flow); such a kit is
    completed there with :func:`assemble_kit`.
    """
    from fedctl.provision import policy
    from fedctl.provision.certs import cert_to_pem, fingerprint, sign_bytes, utcnow

    startup: dict[str, KitFile] = {}

    def add(name: str, data: bytes, mode: int = 0o644) -> None:
        startup[name] = KitFile(f"{STARTUP}/{name}", data, mode)

    add(CONFIG_FILE, _json_bytes(kit_config(project, identity, labels or {})))
    add(CERT_FILE, cert_to_pem(cert))
    add(CA_FILE, cert_to_pem(ca_cert))
    if identity.type in ("server", "site"):
        add("start.sh", _script(identity, project.name, "start"), 0o755)
        add("stop.sh", _script(identity, project.name, "stop"), 0o755)
    manifest = {
        "manifest_version": KIT_VERSION,
        "project": project.name,
        "participant": identity.to_dict(),
        "ca_sha256": fingerprint(ca_cert),
        "created": utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {n: hashlib.sha256(f.data).hexdigest() for n, f in sorted(startup.items())},
        "unlisted": sorted(UNLISTED),
    }
    manifest_bytes = _json_bytes(manifest)
    add(MANIFEST_FILE, manifest_bytes)
    add(SIGNATURE_FILE, sign_bytes(ca_key, manifest_bytes))
    if key_pem is not None:
        add(KEY_FILE, key_pem, 0o600)

    files = [
        KitFile(
            "README.txt",
            _readme(identity, project.name, _hostport(project.server.name, project.server.port)),
        )
    ]
    files += [startup[n] for n in sorted(startup)]
    if identity.type in ("server", "site"):
        files.append(
            KitFile(
                f"{LOCAL}/authorization.yaml",
                policy.authorization_yaml(identity.name, project.name).encode(),
            )
        )
        if identity.type == "site":
            files.append(
                KitFile(f"{LOCAL}/privacy.yaml", policy.privacy_yaml(identity.name).encode())
            )
        files.append(
            KitFile(
                f"{LOCAL}/resources.yaml",
                policy.resources_yaml(
                    identity.name, resources or {}, server=identity.type == "server"
                ).encode(),
            )
        )
    return files


_DIRS = (STARTUP, LOCAL, TRANSFER)


def write_kit_dir(files: Iterable[KitFile], dest: Path) -> None:
    """Write a kit folder at ``dest`` (which must not exist); keys are 0600 from the start."""
    dest.mkdir(mode=0o755)
    for d in _DIRS:
        (dest / d).mkdir(mode=0o755, exist_ok=True)
    for f in files:
        path = dest / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(f.data)
        if f.mode & 0o077 == 0:
            os.chmod(path, f.mode)  # exact, whatever the umask


def write_kit_zip(files: Iterable[KitFile], top: str, dest: Path) -> None:
    """Write the kit as a zip with one top folder ``top``; Unix modes (0600 keys) are kept."""
    now = dt.datetime.now().timetuple()[:6]
    files = list(files)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        dirs = {top} | {f"{top}/{d}" for d in _DIRS}
        for f in files:
            parts = PurePosixPath(f.path).parts[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add(f"{top}/" + "/".join(parts[:i]))
        for d in sorted(dirs):
            info = zipfile.ZipInfo(d + "/", date_time=now)
            info.create_system = 3
            info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
            zf.writestr(info, b"")
        for f in files:
            info = zipfile.ZipInfo(f"{top}/{f.path}", date_time=now)
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | f.mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, f.data)


def read_kit_zip(src: Path) -> tuple[str, list[KitFile]]:
    """Read a kit zip safely (no absolute or ``..`` paths, no links, size-limited).

    Returns the top folder name and the files; modes come from the zip (keys forced to 0600).
    """
    try:
        zf = zipfile.ZipFile(src)
    except (OSError, zipfile.BadZipFile) as exc:
        raise KitError(f"{src}: not a readable zip file ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_KIT_ZIP_FILES:
            raise KitError(f"{src}: {len(infos)} entries, more than a kit ever has")
        total = sum(i.file_size for i in infos)
        if total > MAX_KIT_ZIP_BYTES:
            raise KitError(f"{src}: {total} bytes unpacked, more than the 16 MiB a kit may hold")
        top: str | None = None
        files: list[KitFile] = []
        for info in infos:
            name = info.filename
            pp = PurePosixPath(name)
            if name.startswith("/") or "\\" in name or ".." in pp.parts or not pp.parts:
                raise KitError(f"{src}: unsafe path {name!r} in the zip")
            if top is None:
                top = pp.parts[0]
            elif pp.parts[0] != top:
                raise KitError(f"{src}: entries outside the kit folder {top!r}: {name!r}")
            mode = (info.external_attr >> 16) & 0o177777
            if stat.S_ISLNK(mode):
                raise KitError(f"{src}: {name!r} is a symbolic link; kits hold plain files only")
            if info.is_dir() or len(pp.parts) == 1:
                continue
            rel = "/".join(pp.parts[1:])
            perm = stat.S_IMODE(mode) or 0o644
            if rel == f"{STARTUP}/{KEY_FILE}":
                perm = 0o600
            files.append(KitFile(rel, zf.read(info), perm))
        if top is None:
            raise KitError(f"{src}: empty zip")
        return top, files


def read_kit_folder(src: Path) -> list[KitFile]:
    """Every regular file of a kit folder as :class:`KitFile` (for re-packing a bundle)."""
    out = []
    for path in sorted(src.rglob("*")):
        if path.is_symlink():
            raise KitError(f"{path}: is a symbolic link; kits hold plain files only")
        if path.is_file():
            out.append(
                KitFile(
                    path.relative_to(src).as_posix(),
                    path.read_bytes(),
                    stat.S_IMODE(path.stat().st_mode),
                )
            )
    return out


# --------------------------------------------------------------------------- loading / verifying


def _fail(root: Path, rel: str, problem: str) -> KitError:
    return KitError(f"{root / rel}: {problem}")


def _read(root: Path, rel: str) -> bytes:
    path = root / rel
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(root, rel, "missing") from None
    except IsADirectoryError:
        raise _fail(root, rel, "is a folder, expected a file") from None
    except OSError as exc:
        raise _fail(root, rel, f"cannot read ({exc.strerror})") from None


def verify_kit(
    kit_dir: str | Path,
    *,
    ca_cert: str | Path | bytes | x509.Certificate | None = None,
    require_key: bool = True,
    now: dt.datetime | None = None,
) -> Kit:
    """Check a kit completely and return it; raise :class:`KitError` naming the offending file.

    Checks, in order: the signed manifest (signature by the kit's CA, and that CA is the one the
    manifest names), every listed file's hash, no unlisted file in ``startup/``, the certificate
    is issued by that CA for the participant in kit.json and is currently valid, and the key
    matches the certificate and is not readable by others. ``ca_cert`` optionally pins the
    expected project CA (a kit from another project is then refused even if self-consistent).
    ``local/`` is not checked: sites may edit it.
    """
    return load_kit(kit_dir, verify=True, ca_cert=ca_cert, require_key=require_key, now=now)


def load_kit(
    kit_dir: str | Path,
    *,
    verify: bool = True,
    ca_cert: str | Path | bytes | x509.Certificate | None = None,
    require_key: bool = True,
    now: dt.datetime | None = None,
) -> Kit:
    """Load a kit's identity and connection settings, verifying it first unless ``verify=False``."""
    from fedctl.provision import certs

    root = Path(kit_dir)
    if not (root / STARTUP).is_dir():
        if not root.exists():
            raise KitError(f"{root}: no such kit folder")
        raise KitError(f"{root}: not a fedctl kit (no startup/ folder)")
    s = f"{STARTUP}/"

    config_bytes = _read(root, s + CONFIG_FILE)
    try:
        cfg = json.loads(config_bytes)
        part = cfg["participant"]
        identity = Identity(
            name=part["name"], org=part["org"], type=part["type"], role=part.get("role")
        )
        server_host = str(cfg["server"]["host"])
        server_port = int(cfg["server"]["port"])
        listen = cfg.get("listen") or {}
        project = str(cfg["project"])
        labels = dict(cfg.get("labels") or {})
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(root, s + CONFIG_FILE, f"not a valid kit config ({exc})") from None
    if cfg.get("kit_version") != KIT_VERSION:
        raise _fail(
            root,
            s + CONFIG_FILE,
            f"kit_version {cfg.get('kit_version')!r} is not supported "
            f"(this fedctl reads {KIT_VERSION})",
        )

    cert_bytes = _read(root, s + CERT_FILE)
    try:
        cert = certs.load_cert(cert_bytes)
    except ValueError:
        raise _fail(root, s + CERT_FILE, "not a PEM certificate") from None

    if verify:
        ca = _verify_manifest(root, require_key=require_key)
        _verify_cert(root, cert, ca, identity, now or certs.utcnow())
        if ca_cert is not None:
            expected = _as_cert(ca_cert)
            if certs.fingerprint(expected) != certs.fingerprint(ca):
                raise _fail(
                    root,
                    s + CA_FILE,
                    f"kit belongs to another CA ({certs.describe_name(ca.subject)}), "
                    f"expected {certs.describe_name(expected.subject)}",
                )
        if require_key or (root / STARTUP / KEY_FILE).exists():
            _verify_key(root, cert)

    return Kit(
        root=root,
        project=project,
        identity=identity,
        server_host=server_host,
        server_port=server_port,
        listen_host=listen.get("host"),
        listen_port=listen.get("port"),
        labels=labels,
        not_after=cert.not_valid_after_utc,
    )


def _as_cert(value: str | Path | bytes | x509.Certificate) -> x509.Certificate:
    from cryptography import x509 as _x509

    from fedctl.provision import certs

    if isinstance(value, _x509.Certificate):
        return value
    data = value if isinstance(value, bytes) else Path(value).read_bytes()
    return certs.load_cert(data)


def _verify_manifest(root: Path, *, require_key: bool) -> x509.Certificate:
    from fedctl.provision import certs

    s = f"{STARTUP}/"
    if not (root / STARTUP / MANIFEST_FILE).exists():
        raise _fail(root, s + MANIFEST_FILE, "missing: this kit is not signed")
    manifest_bytes = _read(root, s + MANIFEST_FILE)
    signature = _read(root, s + SIGNATURE_FILE)
    try:
        manifest = json.loads(manifest_bytes)
        listed: dict[str, str] = dict(manifest["files"])
        ca_sha = str(manifest["ca_sha256"])
    except (ValueError, KeyError, TypeError):
        raise _fail(root, s + MANIFEST_FILE, "not a valid kit manifest") from None
    try:
        ca = certs.load_cert(_read(root, s + CA_FILE))
    except ValueError:
        raise _fail(root, s + CA_FILE, "not a PEM certificate") from None
    if certs.fingerprint(ca) != ca_sha:
        raise _fail(
            root,
            s + CA_FILE,
            "is not the CA this kit was signed for (foreign or replaced CA certificate)",
        )
    if not certs.verify_bytes(ca.public_key(), signature, manifest_bytes):
        raise _fail(
            root,
            s + MANIFEST_FILE,
            f"signature does not verify against {s}{CA_FILE} "
            "(manifest edited or signed by another CA)",
        )
    for name, digest in sorted(listed.items()):
        if "/" in name or name in ("", ".", ".."):
            raise _fail(root, s + MANIFEST_FILE, f"lists an invalid file name {name!r}")
        path = root / STARTUP / name
        if not path.is_file():
            raise _fail(root, s + name, "missing (it is listed in the signed manifest)")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise _fail(
                root,
                s + name,
                "modified since the kit was signed (SHA-256 differs from MANIFEST.json)",
            )
    for path in sorted((root / STARTUP).iterdir()):
        if path.name not in listed and path.name not in UNLISTED:
            what = "folder" if path.is_dir() else "file"
            raise _fail(
                root,
                s + path.name,
                f"extra {what} not in the signed manifest (startup/ holds only what the "
                "provisioner signed; put your own files in local/)",
            )
    if require_key and not (root / STARTUP / KEY_FILE).exists():
        raise _fail(root, s + KEY_FILE, "missing (the participant's private key)")
    return ca


def _verify_cert(
    root: Path, cert: x509.Certificate, ca: x509.Certificate, identity: Identity, now: dt.datetime
) -> None:
    from fedctl.provision import certs
    from fedctl.provision.identity import identity_from_certificate

    rel = f"{STARTUP}/{CERT_FILE}"
    if not certs.is_issued_by(cert, ca):
        raise _fail(
            root, rel, f"not issued by {STARTUP}/{CA_FILE} ({certs.describe_name(ca.subject)})"
        )
    try:
        got = identity_from_certificate(cert, what=str(root / rel))
    except IdentityError as exc:
        raise KitError(str(exc)) from None
    if got != identity:
        raise _fail(root, rel, f"is for {got}, but {STARTUP}/{CONFIG_FILE} names {identity}")
    for c, which in ((ca, f"{STARTUP}/{CA_FILE}"), (cert, rel)):
        if now < c.not_valid_before_utc:
            raise _fail(
                root,
                which,
                f"not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                "check this machine's clock",
            )
        if now > c.not_valid_after_utc:
            raise _fail(
                root,
                which,
                f"expired on {c.not_valid_after_utc:%Y-%m-%d}; ask the project admin for a new kit",
            )


def _verify_key(root: Path, cert: x509.Certificate) -> None:
    from fedctl.provision import certs

    rel = f"{STARTUP}/{KEY_FILE}"
    path = root / rel
    key_bytes = _read(root, rel)
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise _fail(
                root,
                rel,
                f"private key is readable by others (mode {mode:04o}); run: chmod 600 {path}",
            )
    try:
        key = certs.load_key(key_bytes)
    except (ValueError, TypeError):
        raise _fail(root, rel, "not an unencrypted PEM private key") from None
    if certs.public_key_bytes(key.public_key()) != certs.public_key_bytes(cert.public_key()):  # type: ignore[arg-type]
        raise _fail(root, rel, f"does not match {STARTUP}/{CERT_FILE} (a key from another kit?)")


# --------------------------------------------------------------------------- helpers for writers


def atomic_write_dir(files: list[KitFile], dest: Path, *, replace: bool = False) -> None:
    """Write a kit folder next to ``dest`` and rename it into place (old one swapped out)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.rmdir()
    try:
        write_kit_dir(files, tmp)
        if dest.exists():
            if not replace:
                raise KitError(f"{dest}: already exists")
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            trash.rmdir()
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_zip(files: list[KitFile], top: str, dest: Path) -> None:
    """Write a kit zip to a temporary name and rename it over ``dest``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_kit_zip(files, top, tmp)
        os.chmod(tmp, 0o600 if any(f.mode & 0o077 == 0 for f in files) else 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
