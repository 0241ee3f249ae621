"""Startup kits as the runtime sees them: :class:`Kit`, loading one, and verifying it.

Verification refuses a kit whose signed files were changed, removed or added to, whose CA
is not the one the manifest was signed for, or whose key does not match its certificate.
The layout is in :mod:`fedctl.provision.kitspec`; kits are written by
:mod:`fedctl.provision.kitfiles`, whose names are re-exported here for older imports.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedctl._fs import sha256_file
from fedctl.errors import NotFound
from fedctl.provision.he import check_kit_context, kit_context_file
from fedctl.provision.identity import Identity, IdentityError
from fedctl.provision.kitfiles import (
    atomic_write_dir,
    atomic_write_zip,
    build_kit_files,
    kit_config,
    read_kit_folder,
    read_kit_zip,
    write_kit_dir,
    write_kit_zip,
)
from fedctl.provision.kitspec import (
    CA_FILE,
    CERT_FILE,
    CONFIG_FILE,
    KEY_FILE,
    KIT_VERSION,
    LOCAL,
    MANIFEST_FILE,
    MAX_KIT_ZIP_BYTES,
    MAX_KIT_ZIP_FILES,
    SIGNATURE_FILE,
    STARTUP,
    TRANSFER,
    UNLISTED,
    KitError,
    KitFile,
    hostport,
)

if TYPE_CHECKING:
    from cryptography import x509

    from fedctl.privacy.he import ContextInfo


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
    #: the project's homomorphic-encryption context, if it has one: a site's secret context
    #: (``startup/he_context.secret``) or the server's public one (``he_context.public``)
    he_context_path: Path | None = None

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

    def he_info(self) -> ContextInfo | None:
        """What the kit's HE context says (parameters, key id, secret or public), if any;
        KitError if the file is of the wrong kind for this participant or unreadable."""
        from fedctl.provision.he import check_kit_context

        return check_kit_context(self.root, self.type)

    @property
    def server_address(self) -> str:
        """``host:port`` to connect to (IPv6 literals bracketed)."""
        return hostport(self.server_host, self.server_port)

    @property
    def listen_address(self) -> str:
        """``host:port`` a server kit binds (server kits only)."""
        if self.listen_host is None or self.listen_port is None:
            raise KitError(f"{self.root}: a {self.type} kit has no listen address")
        return hostport(self.listen_host, self.listen_port)


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
    kit_dir: str | os.PathLike[str],
    *,
    ca_cert: str | Path | bytes | x509.Certificate | None = None,
    require_key: bool = True,
    now: dt.datetime | None = None,
) -> Kit:
    """Check a kit completely and return it; raise :class:`KitError` naming the offending file.

    Checks, in order: the signed manifest (signature by the kit's CA, and that CA is the one the
    manifest names), every listed file's hash, no unlisted file in ``startup/``, the certificate
    is issued by that CA for the participant in kit.json and is currently valid, and the key
    matches the certificate and is not readable by others; an HE context, if any, is of the
    participant's kind (secret for sites, public for the server) and a secret one is private.
    ``ca_cert`` optionally pins the
    expected project CA (a kit from another project is then refused even if self-consistent).
    ``local/`` is not checked: sites may edit it.
    """
    return load_kit(kit_dir, verify=True, ca_cert=ca_cert, require_key=require_key, now=now)


def load_kit(
    kit_dir: str | os.PathLike[str],
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
            raise NotFound(f"{root}: no such kit folder")
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
        check_kit_context(root, identity.type)

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
        he_context_path=kit_context_file(root, identity.type),
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
        if sha256_file(path) != digest:
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


__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "CONFIG_FILE",
    "KEY_FILE",
    "KIT_VERSION",
    "LOCAL",
    "MANIFEST_FILE",
    "MAX_KIT_ZIP_BYTES",
    "MAX_KIT_ZIP_FILES",
    "SIGNATURE_FILE",
    "STARTUP",
    "TRANSFER",
    "UNLISTED",
    "Kit",
    "KitError",
    "KitFile",
    "atomic_write_dir",
    "atomic_write_zip",
    "build_kit_files",
    "kit_config",
    "load_kit",
    "read_kit_folder",
    "read_kit_zip",
    "verify_kit",
    "write_kit_dir",
    "write_kit_zip",
]
