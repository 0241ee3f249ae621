"""Spare transfer files: a folder that keeps them hands a retired file to the next writer, which
overwrites it in place (its pages are still in the page cache) and renames it; a file is retired
only once nothing maps it, and a folder that keeps none removes what is retired."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from fedctl import _fs
from fedctl.codec import tensorfiles as tf
from fedctl.transport import rpc


@pytest.fixture
def small_spares(monkeypatch):
    """Spares from 1,000 bytes, removals at once (no hold)."""
    monkeypatch.setattr(_fs, "SPARE_MIN_BYTES", 1000)
    monkeypatch.setattr(_fs, "REMOVE_HOLD", 0.0)


def _spares(folder: Path) -> list[Path]:
    return sorted((folder / _fs.SPARE_DIR).iterdir())


def test_a_retired_file_is_overwritten_by_the_next_writer(tmp_path, small_spares) -> None:
    _fs.enable_spares(tmp_path)
    big = {"w": torch.arange(1000.0)}
    tf.save_file(big, tmp_path / "a")
    inode = (tmp_path / "a").stat().st_ino
    _fs.retire(tmp_path / "a")
    assert not (tmp_path / "a").exists() and [p.stat().st_ino for p in _spares(tmp_path)] == [inode]
    small = {"v": torch.full((300,), 7.0)}  # shorter than the spare: its tail must go
    tf.save_file(small, tmp_path / "b")
    assert (tmp_path / "b").stat().st_ino == inode and _spares(tmp_path) == []
    assert (tmp_path / "b").stat().st_size == sum(len(p) for p in tf.iter_encode(small, None))
    assert torch.equal(tf.load_file(tmp_path / "b")[0]["v"], small["v"])
    tf.save_file(big, tmp_path / "c")  # no spare left: a new file
    assert (tmp_path / "c").stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == [_fs.SPARE_DIR, "b", "c"]


def test_retire_keeps_only_large_files_and_a_bounded_number(tmp_path, small_spares) -> None:
    _fs.enable_spares(tmp_path)
    (tmp_path / "small").write_bytes(b"x" * 999)
    _fs.retire(tmp_path / "small")
    _fs.retire(tmp_path / "missing")  # no error
    assert not (tmp_path / "small").exists() and _spares(tmp_path) == []
    for i in range(_fs.SPARE_LIMIT + 2):
        (tmp_path / f"f{i}").write_bytes(b"x" * 1000)
        _fs.retire(tmp_path / f"f{i}")
    assert len(_spares(tmp_path)) == _fs.SPARE_LIMIT
    assert [p.name for p in tmp_path.iterdir()] == [_fs.SPARE_DIR]


def test_a_folder_without_spares_removes_what_is_retired(tmp_path, small_spares) -> None:
    (tmp_path / "f").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "f")
    assert list(tmp_path.iterdir()) == []
    _fs.enable_spares(tmp_path)
    (tmp_path / "g").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "g")
    _fs.drop_spares(tmp_path)  # the job's end: spares go, and later retired files too
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "h").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "h")
    _fs.drop_spares(tmp_path)  # twice: no error
    assert list(tmp_path.iterdir()) == []


def test_a_received_file_reuses_a_spare_only_when_asked(tmp_path, small_spares) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3000))
    out = tmp_path / "out"
    out.mkdir()
    _fs.enable_spares(out)
    (out / "old").write_bytes(b"y" * 9000)
    inode = (out / "old").stat().st_ino
    _fs.retire(out / "old")
    rpc.receive_file(iter(list(rpc.file_frames(src))), out / "a", max_bytes=10**6)
    assert (out / "a").stat().st_ino != inode and len(_spares(out)) == 1  # a download: new
    rpc.receive_file(iter(list(rpc.file_frames(src))), out / "b", max_bytes=10**6, reuse=True)
    assert (out / "b").stat().st_ino == inode and _spares(out) == []
    assert (out / "b").read_bytes() == src.read_bytes()  # the spare's longer tail is gone
    (out / "b").rename(out / "c")
    _fs.retire(out / "c")
    frames_ = list(rpc.file_frames(src))
    with pytest.raises(Exception, match="before its end frame"):
        rpc.receive_file(iter(frames_[:-1]), out / "d", max_bytes=10**6, reuse=True)
    assert sorted(p.name for p in out.iterdir()) == [_fs.SPARE_DIR, "a"]  # nothing partial


def test_a_lazy_file_is_retired_only_once_no_tensor_maps_it(
    tmp_path, small_spares, monkeypatch
) -> None:
    """A tensor mapped from a result outlives the result's reader: its file must not become a
    spare (and be overwritten under it) until the tensor is gone too."""
    monkeypatch.setattr(tf, "LAZY_MAP_BYTES", 1)  # map every tensor, however small
    _fs.enable_spares(tmp_path)
    src = {"w": torch.linspace(-1, 1, 2000)}
    tf.save_file(src, tmp_path / "r")
    lazy = tf.LazyTensorFile(tmp_path / "r", delete=True)
    kept = lazy["w"] * 1  # read and let go: its mapping is gone with the temporary
    kept = lazy["w"]  # mapped, and kept
    del lazy
    gc.collect()
    assert (tmp_path / "r").exists() and _spares(tmp_path) == []  # the tensor still maps it
    tf.save_file({"w": torch.zeros(2000)}, tmp_path / "other")  # a writer meanwhile
    assert torch.equal(kept, src["w"])
    del kept
    gc.collect()
    assert not (tmp_path / "r").exists() and len(_spares(tmp_path)) == 1


def test_a_file_is_not_kept_when_memory_is_short(tmp_path, small_spares, monkeypatch) -> None:
    """A spare only helps while its pages can stay: with little memory available, it is removed."""
    _fs.enable_spares(tmp_path)
    monkeypatch.setattr(_fs, "_total_memory", lambda: 80_000)
    monkeypatch.setattr(_fs, "_available_memory", lambda: 15_000)  # 10,000 must stay
    (tmp_path / "f").write_bytes(b"x" * 5001)
    _fs.retire(tmp_path / "f")
    assert not (tmp_path / "f").exists() and _spares(tmp_path) == []
    (tmp_path / "g").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "g")
    assert len(_spares(tmp_path)) == 1


def test_a_file_is_not_kept_and_the_spares_go_when_the_disk_is_short(
    tmp_path, small_spares, monkeypatch
) -> None:
    """Spares hold disk: below a tenth of the filesystem free plus two files' room, the retired
    file is removed and so are the folder's spares."""
    _fs.enable_spares(tmp_path)
    free = {"bytes": 10**12}
    real = os.statvfs

    class Stat:
        f_frsize, f_blocks = 1, 100_000

        @property
        def f_bavail(self) -> int:
            return free["bytes"]

    monkeypatch.setattr(
        os, "statvfs", lambda p: Stat() if Path(p).is_relative_to(tmp_path) else real(p)
    )
    (tmp_path / "f").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "f")
    assert len(_spares(tmp_path)) == 1
    free["bytes"] = 10_000 + 2 * 5000 - 1  # a tenth of 100,000 and two files, less one byte
    (tmp_path / "g").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "g")
    assert not (tmp_path / "g").exists() and _spares(tmp_path) == []
    free["bytes"] += 1
    (tmp_path / "h").write_bytes(b"x" * 5000)
    _fs.retire(tmp_path / "h")
    assert len(_spares(tmp_path)) == 1


def test_available_memory_counts_the_page_cache_the_kernel_can_take_back() -> None:
    """Spares are weighed against MemAvailable, not MemFree: once a machine's page cache has
    filled its memory, free memory alone would keep no spare at all."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    got = _fs._available_memory()
    assert abs(got - fields["MemAvailable"]) < 256 * 2**20  # read again a moment later
    assert got >= _fs._pages("SC_AVPHYS_PAGES") - 256 * 2**20  # at least what is free


def test_available_memory_falls_back_to_free_memory_without_meminfo(monkeypatch) -> None:
    """Where the kernel has no /proc/meminfo, free memory (or, unknown, no limit) is used."""
    real_open = open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_meminfo)
    assert _fs._available_memory() == (_fs._pages("SC_AVPHYS_PAGES") or 1 << 62)


def test_resident_bytes_follows_this_process_and_falls_back_to_psutil(
    monkeypatch, tmp_path
) -> None:
    """The simulator's per-round collection is decided on this figure (fedctl/sim/worker.py)."""
    import psutil

    before = _fs.resident_bytes()
    block = b"\x01" * (64 << 20)  # written, so resident
    grown = _fs.resident_bytes() - before
    assert grown >= 60 << 20, grown
    assert abs(_fs.resident_bytes() - psutil.Process().memory_info().rss) < 16 << 20
    del block
    # a forked child reads its own figure, not its parent's descriptor's
    assert _fs._statm is not None and _fs._statm[0] == os.getpid()
    monkeypatch.setattr(_fs, "_statm", (os.getpid() + 1, -1))  # as if inherited from a parent
    assert abs(_fs.resident_bytes() - psutil.Process().memory_info().rss) < 16 << 20
    assert _fs._statm[0] == os.getpid()

    # a script that closed the descriptor, its number since taken by another file
    os.close(_fs._statm[1])
    other = tmp_path / "data.txt"
    other.write_text("not a statm line\n")
    taken = os.open(other, os.O_RDONLY)
    try:
        assert taken == _fs._statm[1]
        assert abs(_fs.resident_bytes() - psutil.Process().memory_info().rss) < 16 << 20
        assert _fs._statm[1] != taken
        assert os.pread(_fs._statm[1], 128, 0).split()[1].isdigit()
    finally:
        os.close(taken)

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr(_fs, "_statm", None)
    monkeypatch.setattr(os, "open", no_proc)  # not Linux
    assert abs(_fs.resident_bytes() - psutil.Process().memory_info().rss) < 16 << 20
