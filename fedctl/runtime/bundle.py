"""Job bundles: a job folder as a zip for submission and deployment, and its safe extraction.

Extraction refuses absolute paths, ``..``, links, device files, more than ``MAX_FILES`` entries and
more than ``max_bytes`` unpacked (checked from the zip directory before anything is written, and
again while writing, since a zip directory can lie), then verifies the job's own file hashes.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from fedctl._fs import sha256_file
from fedctl.constants import MAX_BUNDLE_BYTES
from fedctl.errors import RecipeError

MAX_FILES = 10_000
#: default cap on an unpacked job (code + initial model); servers can raise it.


class BundleError(RecipeError):
    """A job bundle that is malformed, unsafe or too big."""


def make_bundle(
    job_dir: str | os.PathLike[str], dest: str | os.PathLike[str], *, with_model: bool = True
) -> str:
    """Zip a job folder (written by ``Recipe.export``) to ``dest``; returns its SHA-256.

    ``with_model=False`` leaves the initial model out (the bundle sites get).
    """
    from fedctl.recipe.jobfolder import read_job_spec

    job_dir, dest = Path(job_dir), Path(dest)
    model = None if with_model else read_job_spec(job_dir, verify=False).model
    tmp = dest.with_name(f".{dest.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(job_dir.rglob("*")):
            if path.is_symlink():
                raise BundleError(f"{path}: job folders hold plain files only (no links)")
            if path.is_file() and path.resolve() != model:
                zf.write(path, path.relative_to(job_dir).as_posix())
    os.replace(tmp, dest)
    return sha256_file(dest)


def extract_bundle(
    bundle: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_BUNDLE_BYTES,
    need_model: bool = True,
) -> Path:
    """Unpack a job bundle into ``dest`` (which must not exist) and verify the job inside.

    Atomic: a bundle that fails any check leaves nothing behind.
    """
    from fedctl.recipe.jobfolder import read_job_spec

    bundle, dest = Path(bundle), Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists")
    try:
        zf = zipfile.ZipFile(bundle)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"job bundle is not a readable zip file ({exc})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_FILES:
                raise BundleError(f"job bundle has {len(infos)} entries (limit {MAX_FILES})")
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise BundleError(
                    f"job bundle unpacks to {declared} bytes, over the limit of {max_bytes}"
                )
            written = 0
            for info in infos:
                rel = _safe_name(info)
                if rel is None:
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > max_bytes:
                            raise BundleError(f"job bundle unpacks to more than {max_bytes} bytes")
                        out.write(block)
        try:
            read_job_spec(tmp, verify=True, need_model=need_model)
        except RecipeError as exc:
            raise BundleError(f"job bundle: {exc}") from None
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _safe_name(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]:
        raise BundleError(f"job bundle has an unsafe path {name!r}")
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no file type
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise BundleError(f"job bundle entry {name!r} is not a plain file")
    if info.is_dir():
        return None
    return "/".join(parts)
