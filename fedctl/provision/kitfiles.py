"""Writing startup kits: their files, the signed manifest, and atomic folder and zip writes.

:func:`build_kit_files` makes every file of one kit in memory (kit.json, certificate, CA,
scripts, the manifest signed by the CA key, the ``local/`` policy templates); the writers put
them on disk as a folder or a zip, each written aside and renamed into place so a reader never
sees half a kit. :func:`read_kit_zip` and :func:`read_kit_folder` read a bundle back for
``fedctl kit assemble``. The layout is described in :mod:`fedctl.provision.kitspec`.
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
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fedctl.provision.identity import Identity
from fedctl.provision.kitspec import (
    CA_FILE,
    CERT_FILE,
    CONFIG_FILE,
    DIRS,
    HE_SECRET_FILE,
    KEY_FILE,
    KIT_VERSION,
    LOCAL,
    MANIFEST_FILE,
    MAX_KIT_ZIP_BYTES,
    MAX_KIT_ZIP_FILES,
    SIGNATURE_FILE,
    STARTUP,
    UNLISTED,
    KitError,
    KitFile,
    hostport,
)

if TYPE_CHECKING:
    from cryptography import x509

    from fedctl.provision.certs import PrivateKey
    from fedctl.provision.project import Project

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


def _readme(identity: Identity, project: str, server_address: str, he: bool = False) -> bytes:
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
    he_note = (
        f"          startup/{HE_SECRET_FILE} is the project's homomorphic-encryption secret\n"
        "          key, shared by the sites only: keep it secret too (mode 0600).\n"
        if he and identity.type == "site"
        else ""
    )
    return (
        head + use + "\n"
        "startup/  identity and connection, signed by the project CA. Do not edit: a changed,\n"
        "          missing or extra file makes fedctl refuse the kit. startup/key.pem is this\n"
        "          participant's private key: keep it secret (mode 0600).\n"
        + he_note
        + "local/    this participant's own policy (authorization, privacy, resources):\n"
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
    he_file: KitFile | None = None,
) -> list[KitFile]:
    """Every file of one kit, with the manifest signed by the CA key.

    ``key_pem`` is None for a kit whose key stays at the site (the CSR flow); such a kit is
    completed there with :func:`assemble_kit`. ``he_file`` is the project's HE context for
    this participant (:meth:`fedctl.provision.he.HEMaterial.kit_file`), signed like the rest.
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
    if he_file is not None:
        _check_he_file(identity, he_file)
        add(PurePosixPath(he_file.path).name, he_file.data, he_file.mode)
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
            _readme(
                identity,
                project.name,
                hostport(project.server.name, project.server.port),
                he=he_file is not None,
            ),
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


def _check_he_file(identity: Identity, he_file: KitFile) -> None:
    """The last guard before a context lands in a kit: only a site's holds the secret key."""
    from fedctl.privacy.he import context_info

    secret = context_info(he_file.data).has_secret_key
    name = PurePosixPath(he_file.path).name
    if (
        identity.type == "admin"
        or secret != (identity.type == "site")
        or (name != HE_SECRET_FILE if secret else name == HE_SECRET_FILE)
    ):
        kind = "secret" if secret else "public"
        raise KitError(f"refusing to put the {kind} HE context in {identity}'s kit as {name}")


def write_kit_dir(files: Iterable[KitFile], dest: Path) -> None:
    """Write a kit folder at ``dest`` (which must not exist); keys are 0600 from the start."""
    dest.mkdir(mode=0o755)
    for d in DIRS:
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
        dirs = {top} | {f"{top}/{d}" for d in DIRS}
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
            if rel in (f"{STARTUP}/{KEY_FILE}", f"{STARTUP}/{HE_SECRET_FILE}"):
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


# --------------------------------------------------------------------------- atomic writes


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


__all__ = [
    "atomic_write_dir",
    "atomic_write_zip",
    "build_kit_files",
    "kit_config",
    "read_kit_folder",
    "read_kit_zip",
    "write_kit_dir",
    "write_kit_zip",
]
