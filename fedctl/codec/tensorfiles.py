"""Tensor files: the safe framing of :mod:`fedctl.codec.tensors` on disk.

Writes are atomic (a temporary file and a rename, optionally fsynced) and can hash while they
write; reads map the file copy-on-write (zero-copy, pages read on first use) or, for models too
large to hold, read tensor by tensor (:class:`LazyTensorFile`). Files interoperate with the
safetensors library both ways (``tests/test_codec.py`` checks it), which fedctl does not need
at run time: ``bench/bench_codec.py`` measured this implementation level with the library for
what fedctl does (docs/architecture.md gives the figures).
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedctl.codec.tensors import (
    DEFAULT_MAX_BYTES,
    MAX_HEADER_BYTES,
    decode,
    iter_encode,
    parse_header,
    tensor_from_bytes,
)
from fedctl.errors import CodecError

if TYPE_CHECKING:
    import torch

    from fedctl.codec.model import FLModel


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    durable: bool = True,
) -> Path:
    """Write tensors to ``path`` atomically (temp file + rename: never a half-written file).

    ``durable`` also flushes the file to disk before the rename (models and checkpoints);
    files that only carry a model from one process to another skip that.
    """
    _write(tensors, Path(path), metadata, durable, None)
    return Path(path)


def save_file_hashed(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    durable: bool = True,
) -> tuple[int, str]:
    """:func:`save_file` that also returns the file's size and SHA-256 (computed on another
    thread while writing)."""
    from fedctl._fs import BackgroundSHA256

    with BackgroundSHA256() as h:
        size = _write(tensors, Path(path), metadata, durable, h)
        return size, h.hexdigest()


def _write(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    metadata: Mapping[str, str] | None,
    durable: bool,
    hasher: Any,
) -> int:
    from fedctl._fs import open_new

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_new(path)  # a spare of the folder, if it keeps any, is overwritten
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for piece in iter_encode(tensors, metadata):
                if hasher is not None:
                    hasher.update(piece)
                size += len(piece)
                fh.write(piece)
            fh.flush()
            os.ftruncate(fh.fileno(), size)  # a longer spare's tail goes
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def load_file(
    path: str | os.PathLike[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    on_release: Callable[[], object] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a tensor file written by :func:`save_file` or the safetensors library.

    The file is mapped copy-on-write, not read: the tensors are views of the page cache, their
    pages are read when first used (and can be dropped again under memory pressure), writing to
    them changes this process's copy only, and unlinking the file afterwards is safe. A file
    fedctl maps is rewritten in place only once nothing maps it (a spare, see
    :func:`fedctl._fs.retire`): ``on_release`` is called when the last tensor (the mapping) is
    gone, to say so.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CodecError(f"{path}: {size} bytes exceeds the limit {max_bytes}")
        if size < 8:
            raise CodecError(f"{path}: {size} bytes is too short for a tensor file")
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise CodecError(f"{path}: no such tensor file") from None
    except OSError as exc:  # a folder, no permission
        raise CodecError(f"{path}: cannot read ({exc.strerror})") from None
    if on_release is not None:
        weakref.finalize(mapped, on_release)
    try:
        return decode(memoryview(mapped), max_bytes, copy=False)
    except CodecError as exc:
        raise CodecError(f"{path}: {exc}") from None


#: a LazyTensorFile maps tensors of at least this many bytes instead of reading them
LAZY_MAP_BYTES = 1 << 20


class LazyTensorFile(Mapping[str, "torch.Tensor"]):
    """A tensor file as a read-only mapping that reads each tensor when it is accessed.

    Tensors of ``LAZY_MAP_BYTES`` or more are not read but mapped, each on its own: a view of
    the page cache (no copy, nothing allocated) that is private (a write changes only that
    tensor) and goes with the tensor. On a 1.2 GB result, checking and adding it took 0.2 s
    instead of 3.2 s. Nothing is kept: iterating twice reads (or maps) twice. This lets a
    consumer that handles one tensor at a time (validation, a running sum) take in a model of
    any size with the memory of its largest tensor. The header is validated (against the
    file's real size) when the object is created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        names: Mapping[str, str] | None = None,
        *,
        delete: bool = False,
    ) -> None:
        self.path = Path(path)
        # with ``delete``, the file goes when the last mapping (or view) onto it is gone
        self._keeper = _FileKeeper(self.path) if delete else None
        try:
            size = self.path.stat().st_size
            if size > max_bytes:
                raise CodecError(f"{self.path}: {size} bytes exceeds the limit {max_bytes}")
            with open(self.path, "rb") as fh:
                prefix = fh.read(8)
                (hlen,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
                if hlen is not None and hlen <= MAX_HEADER_BYTES and 8 + hlen <= size:
                    prefix += fh.read(hlen)
        except FileNotFoundError:
            raise CodecError(f"{self.path}: no such tensor file") from None
        except OSError as exc:  # a folder, no permission
            raise CodecError(f"{self.path}: cannot read ({exc.strerror})") from None
        if hlen is None:
            raise CodecError(f"{self.path}: shorter than its 8-byte header length")
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise CodecError(f"{self.path}: tensor header length is out of bounds")
        try:
            header = parse_header(prefix, max_bytes)
        except CodecError as exc:
            raise CodecError(f"{self.path}: {exc}") from None
        if header.total_len != size:
            raise CodecError(
                f"{self.path}: {size} bytes but its header describes {header.total_len}"
            )
        self.header = header
        self._base = 8 + header.header_len
        self._entries = {e.name: e for e in header.entries}
        #: exposed name → stored name (a view onto part of the file, e.g. without a prefix)
        self._names = dict(names) if names is not None else {n: n for n in self._entries}

    def view(self, names: Mapping[str, str]) -> LazyTensorFile:
        """A mapping over some of the stored tensors under other names (same file)."""
        out = object.__new__(LazyTensorFile)
        out.__dict__.update(self.__dict__)
        out._names = dict(names)
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[self._names[name]]
        if entry.nbytes >= LAZY_MAP_BYTES:
            return self._mapped(entry)
        data = bytearray(entry.nbytes)
        with open(self.path, "rb") as fh:
            fh.seek(self._base + entry.begin)
            if fh.readinto(data) != entry.nbytes:
                raise CodecError(f"{self.path}: truncated inside tensor {entry.name!r}")
        return tensor_from_bytes(data, entry, -entry.begin, copy=False)

    def _mapped(self, entry: Any) -> torch.Tensor:
        """A large tensor as a view of its own copy-on-write mapping of the file: its pages are
        the page cache's (no copy, nothing new allocated), a write changes only this process's
        copy, and the mapping goes with the tensor."""
        start = self._base + entry.begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb") as fh:
                mapped = mmap.mmap(
                    fh.fileno(),
                    start + entry.nbytes - aligned,
                    access=mmap.ACCESS_COPY,
                    offset=aligned,
                )
        except (OSError, ValueError) as exc:
            raise CodecError(f"{self.path}: cannot map tensor {entry.name!r} ({exc})") from None
        if self._keeper is not None:  # the file outlives the mapping (see _FileKeeper)
            weakref.finalize(mapped, _keep, self._keeper)
        view = memoryview(mapped)  # the tensor keeps the view, the view keeps the mapping
        return tensor_from_bytes(view, entry, start - aligned - entry.begin, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def stored_names(self) -> list[str]:
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this mapping exposes (from the header: nothing is read)."""
        return sum(self._entries[stored].nbytes for stored in self._names.values())


def payload_nbytes(params: Mapping[str, Any] | None) -> int:
    """Bytes of a model's tensors (elements × element size), without reading lazy ones: what a
    task or a result moves besides its small JSON header."""
    if not params:
        return 0
    if isinstance(params, LazyTensorFile):
        return params.nbytes
    total = 0
    for value in params.values():
        numel, size = getattr(value, "numel", None), getattr(value, "element_size", None)
        if callable(numel) and callable(size):
            total += int(numel()) * int(size())
        else:
            total += int(getattr(value, "nbytes", 0) or 0)
    return total


class _FileKeeper:
    """Lets a file go (:func:`fedctl._fs.retire`) when garbage-collected: it is shared by a
    LazyTensorFile, its views and every mapping made from them, so the file is retired (and may
    be overwritten as a spare) only once nothing maps it."""

    def __init__(self, path: Path) -> None:
        from fedctl._fs import retire

        weakref.finalize(self, retire, path)


def _keep(keeper: _FileKeeper) -> None:
    """Finalizer of a mapping: holding ``keeper`` (as its argument) until the mapping is gone
    is its whole job."""


def lazy_model(
    header: Any,
    path: str | os.PathLike[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    delete: bool = False,
) -> FLModel:
    """An FLModel (its JSON header, its tensors in ``path``) whose tensors are read one at a
    time when used; with ``delete``, the file goes when the last view of it is gone."""
    from fedctl.codec.model import join_model

    lazy = LazyTensorFile(path, max_bytes, delete=delete)
    groups: dict[str, dict[str, str]] = {"p": {}, "o": {}}
    for name in lazy.stored_names:
        prefix, _, key = name.partition(":")
        if prefix not in groups or not key:
            raise CodecError(f"model payload has an unexpected tensor {name!r}")
        groups[prefix][key] = name
    model = join_model(header, {})
    if model.params is not None:
        model.params = lazy.view(groups["p"])
    if model.optimizer_params is not None:
        model.optimizer_params = lazy.view(groups["o"])
    return model
