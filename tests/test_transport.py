"""Frames, chunked file transfers, job bundles and the job store: the runtime's safe parts."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest
from fdtargets import fd_targets

from fedctl.codec import frames, protocol
from fedctl.errors import FedctlError, NotFound
from fedctl.runtime import store as st
from fedctl.runtime.bundle import BundleError, extract_bundle, make_bundle
from fedctl.transport import rpc


def test_frame_round_trip_and_limits() -> None:
    raw = frames.encode({"t": "chunk", "n": 1}, b"\x00\x01")
    assert frames.decode(raw) == ({"t": "chunk", "n": 1}, b"\x00\x01")
    with pytest.raises(frames.FrameError, match="unexpected message type 'chunk'"):
        frames.decode(raw, {"hello"})
    with pytest.raises(frames.FrameError, match="payload"):
        frames.encode({"t": "x"}, b"\0" * (frames.CHUNK + 1))


def test_decode_view_gives_the_payload_without_a_copy() -> None:
    raw = frames.encode({"t": "chunk"}, b"abc" * 1000)
    header, view = frames.decode_view(raw)
    assert header == {"t": "chunk"} and isinstance(view, memoryview) and view.readonly
    assert view.obj is raw and bytes(view) == frames.decode(raw)[1]  # same bytes, not copied
    msg, payload = protocol.decode_chunk(raw)
    assert isinstance(msg, protocol.Chunk) and payload.obj is raw
    with pytest.raises(frames.FrameError, match="unexpected message type 'push'"):
        protocol.decode_chunk(protocol.encode(protocol.Push("j", "t", 1)))
    with pytest.raises(frames.FrameError, match="bad magic"):
        frames.decode_view(b"XX\x01\x00\x02\x00\x00\x00{}")


def test_background_sha256_equals_hashlib_and_always_stops_its_thread() -> None:
    import hashlib
    import threading

    from fedctl._fs import BackgroundSHA256

    pieces = [b"a" * 5000, memoryview(b"b" * 70000), b"", bytes(range(256)) * 99]
    expected = hashlib.sha256(b"".join(bytes(p) for p in pieces)).hexdigest()
    before = set(threading.enumerate())

    def ours() -> set[threading.Thread]:
        """This test's hashing threads still alive (other tests' threads may end meanwhile)."""
        return {t for t in set(threading.enumerate()) - before if t.name == "sha256"}

    h = BackgroundSHA256(depth=2)
    assert len(ours()) == 1
    for p in pieces:
        h.update(p)
    assert h.hexdigest() == expected and h.hexdigest() == expected  # idempotent
    with pytest.raises(RuntimeError), BackgroundSHA256() as h2:
        h2.update(b"x")
        assert len(ours()) == 1  # the first one has ended, the second runs
        raise RuntimeError("the writer failed")
    assert not ours()  # both threads ended


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00", "shorter than its prefix"),
        (b"XX\x01\x00\x02\x00\x00\x00{}", "bad magic"),
        (b"FC\x09\x00\x02\x00\x00\x00{}", "unsupported frame version"),
        (b"FC\x01\x00\xff\xff\xff\x00{}", "out of bounds"),
        (b"FC\x01\x00\x03\x00\x00\x00{x}", "not valid JSON"),
        (b"FC\x01\x00\x02\x00\x00\x00[]", "object with a string 't'"),
        (b'FC\x01\x00\x0a\x00\x00\x00{"t": 123}', "object with a string 't'"),
    ],
)
def test_malformed_frames_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(frames.FrameError, match=message):
        frames.decode(data)


def test_field_checks_types() -> None:
    h = {"t": "push", "size": True, "job": "j", "task_id": "t"}
    assert protocol.parse({**h, "size": 3}, protocol.Push).job == "j"
    with pytest.raises(frames.FrameError, match="push.size"):
        protocol.parse(h, protocol.Push)  # bool is not an int here


def test_file_transfer_checks_size_and_hash(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * (frames.CHUNK + 10))
    msgs = list(rpc.file_frames(src))
    size, _ = rpc.receive_file(iter(msgs), tmp_path / "ok.bin", max_bytes=10**9)
    assert size == frames.CHUNK + 10 and (tmp_path / "ok.bin").read_bytes() == src.read_bytes()
    with pytest.raises(frames.FrameError, match="exceeds the limit"):
        rpc.receive_file(iter(msgs), tmp_path / "big.bin", max_bytes=100)
    with pytest.raises(frames.FrameError, match="announced SHA-256"):
        rpc.receive_file(iter(msgs), tmp_path / "bad.bin", max_bytes=10**9, expect_sha256="0" * 64)
    with pytest.raises(frames.FrameError, match="before its end frame"):
        rpc.receive_file(iter(msgs[:-1]), tmp_path / "cut.bin", max_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.bin", "src.bin"]  # nothing partial


def _zip(path: Path, entries: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_bundle_round_trip(toy_recipe, tmp_path: Path) -> None:
    job = toy_recipe.export(tmp_path / "job")
    make_bundle(job, tmp_path / "b.zip")
    out = extract_bundle(tmp_path / "b.zip", tmp_path / "out")
    assert (out / "code" / "client.py").read_text() == (job / "code" / "client.py").read_text()


@pytest.mark.parametrize(
    ("entries", "link", "message"),
    [
        ({"../evil.py": b"x"}, None, "unsafe path '../evil.py'"),
        ({"/etc/cron.d/x": b"x"}, None, "unsafe path"),
        ({"code/a.py": b"x"}, "code/link", "not a plain file"),
        ({"code/a.py": b"x"}, None, "not a job folder"),
    ],
)
def test_unsafe_bundles_are_refused(tmp_path: Path, entries, link, message) -> None:
    bundle = _zip(tmp_path / "b.zip", entries, link)
    with pytest.raises(BundleError, match=message):
        extract_bundle(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b.zip"]  # no half-extracted folder


def test_oversized_bundle_is_refused(toy_recipe, tmp_path: Path) -> None:
    job = toy_recipe.export(tmp_path / "job")
    make_bundle(job, tmp_path / "b.zip")
    with pytest.raises(BundleError, match="over the limit"):
        extract_bundle(tmp_path / "b.zip", tmp_path / "out", max_bytes=1000)


def _rec(job_id: str) -> st.JobRecord:
    return st.JobRecord(
        job_id,
        "n",
        "fedavg",
        "a@x",
        "x",
        st.SUBMITTED,
        None,
        1.0,
        None,
        None,
        None,
        "/j",
        "/r",
        2,
        3,
        0,
        "sha",
        10,
    )


def test_job_store_transitions_and_events(tmp_path: Path) -> None:
    store = st.JobStore(tmp_path / "jobs.db")
    store.add(_rec("j1"))
    with pytest.raises(FedctlError, match="cannot become FINISHED"):
        store.transition("j1", st.FINISHED)
    store.transition("j1", st.SCHEDULED, sites=["site-1", "site-2"])
    rec = store.transition("j1", st.RUNNING)
    assert rec.sites == ["site-1", "site-2"] and rec.started_at is not None
    store.add_event("j1", "round_completed", {"round": 0})
    store.add_event("j1", "round_completed", {"round": 1})
    assert [e["round"] for e in store.events("j1", after=1)] == [1]
    store.transition("j1", st.FAILED, "boom")
    with pytest.raises(FedctlError, match="cannot become RUNNING"):
        store.transition("j1", st.RUNNING)
    with pytest.raises(NotFound):
        store.get("nope")
    store.close()
    again = st.JobStore(tmp_path / "jobs.db")  # persisted
    assert again.get("j1").state == st.FAILED and again.get("j1").reason == "boom"


def test_site_bundles_leave_the_initial_model_out(toy_recipe, tmp_path: Path) -> None:
    from fedctl.recipe.jobfolder import read_job_spec

    job = toy_recipe.export(tmp_path / "job")
    make_bundle(job, tmp_path / "site.zip", with_model=False)
    names = zipfile.ZipFile(tmp_path / "site.zip").namelist()
    assert "model/initial.safetensors" not in names and "code/client.py" in names
    with pytest.raises(BundleError, match="model/initial.safetensors is listed"):
        extract_bundle(tmp_path / "site.zip", tmp_path / "strict")
    out = extract_bundle(tmp_path / "site.zip", tmp_path / "site", need_model=False)
    spec = read_job_spec(out, need_model=False)
    assert spec.train_script == "client.py" and spec.name == "toy"
    (out / "code" / "client.py").write_text("tampered\n")
    with pytest.raises(Exception, match="does not match its hash"):
        read_job_spec(out, need_model=False)


def test_reliable_link_resends_unacked_and_drops_duplicates() -> None:
    import queue

    from fedctl.transport.reliable import ReliableLink

    def drain(q: queue.Queue) -> list[dict]:
        out = []
        while not q.empty():
            item = q.get()
            out.append(item if item is None else frames.decode(item)[0])
        return out

    sender, receiver = ReliableLink(), ReliableLink()
    sender.send(protocol.CancelTask(job="j", task_id="1"))  # offline: kept for later
    first = queue.Queue()
    sender.attach(first)
    sender.resend()
    sender.send(protocol.CancelTask(job="j", task_id="2"))
    sent = drain(first)
    assert [(m["seq"], m["task_id"]) for m in sent] == [(1, "1"), (2, "2")]
    rq = queue.Queue()
    receiver.attach(rq)
    assert receiver.accept(1) and receiver.accept(2)
    assert not receiver.accept(2)  # a duplicate after a resend is not processed again
    assert [m["seq"] for m in drain(rq)] == [1, 2, 2]  # but acknowledged each time
    sender.acked(1)  # the ack for 2 was lost with the stream
    second = queue.Queue()
    sender.attach(second)
    assert drain(first) == [None]  # the old stream is told to close
    sender.resend()
    assert [m["seq"] for m in drain(second)] == [2]
    sender.detach(first)  # a stale detach does not drop the new stream
    assert sender.online
    sender.reset(outgoing=True)
    sender.resend()
    assert drain(second) == []


def test_parse_checks_headers_built_in_python_like_received_ones() -> None:
    """Found by tests/test_fuzz.py: a header that never went through JSON (a huge int in a float
    field, a NaN, a non-string key, not a dict) gave OverflowError, TypeError or
    AttributeError, or was accepted (NaN)."""
    good = {"t": "welcome", "server_id": "s", "recv_seq": 1, "heartbeat": 5}
    assert protocol.parse(good, protocol.Welcome).heartbeat == 5.0
    for header, message in [
        ({**good, "heartbeat": 10**400}, "heartbeat: integer out of the 64-bit range"),
        ({**good, "heartbeat": float("nan")}, "heartbeat: nan is not a JSON number"),
        ({**good, 1: 2}, "a int key at message header"),
        ({"t": 10**5000}, "t: integer out of the 64-bit range"),
        ({"t": "x" * 10_000}, "unexpected message type 'xxxx"),
        ({**good, "y" * 10_000: 1}, "unknown field 'yyyy"),
    ]:
        with pytest.raises(frames.FrameError, match=message) as err:
            protocol.parse(header, protocol.Welcome)
        assert len(str(err.value)) < 200
    with pytest.raises(frames.FrameError, match="must be an object, got list"):
        protocol.parse([1], protocol.Welcome)  # type: ignore[arg-type]


def _open_deleted(path: Path) -> list[str]:
    """This process's descriptors of ``path`` after it was removed."""
    return [t for t in fd_targets() if t == f"{path} (deleted)"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_remove_soon_frees_a_large_file_later_on_its_own_thread(tmp_path, monkeypatch) -> None:
    """The name goes at once; a large file's blocks are freed when its last descriptor closes
    on the remover's thread after the hold, so a slow trim never waits in the caller."""
    import time

    from fedctl import _fs

    monkeypatch.setattr(_fs, "SLOW_REMOVE_BYTES", 1000)
    monkeypatch.setattr(_fs, "REMOVE_HOLD", 0.3)
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(b"x" * 1000)
    small.write_bytes(b"x" * 999)
    _fs.remove_soon(big)
    _fs.remove_soon(small)
    _fs.remove_soon(tmp_path / "missing")  # no error
    assert not big.exists() and not small.exists()
    assert len(_open_deleted(big)) == 1 and _open_deleted(small) == []
    deadline = time.monotonic() + 10
    while _open_deleted(big) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_deleted(big) == []
    with pytest.raises(IsADirectoryError):
        _fs.remove_soon(tmp_path)  # a folder is refused as unlink refuses it
    assert tmp_path.is_dir()


def test_a_site_retires_a_model_file_once_the_script_releases_it(tmp_path, monkeypatch) -> None:
    """The script may keep the tensors of a model it was given: the agent keeps the file until
    the script says it no longer maps it, then keeps it as a spare for the next download; it
    retires only files it lent, and removes what is still lent when the script ends."""
    from fedctl import _fs
    from fedctl.runtime.lent import LentFiles

    monkeypatch.setattr(_fs, "SPARE_MIN_BYTES", 10)
    monkeypatch.setattr(_fs, "REMOVE_HOLD", 0.0)
    _fs.enable_spares(tmp_path)
    lent = LentFiles()
    files = [tmp_path / f"task{i}" for i in range(3)]
    for path in files:
        path.write_bytes(b"m" * 100)
        lent.lend(path)
    other = tmp_path / "not-lent"
    other.write_bytes(b"x" * 100)
    lent.returned([str(files[0]), str(other), "/etc/passwd"], [str(files[1]), str(other)])
    assert not files[0].exists() and not files[1].exists() and other.exists() and len(lent) == 1
    assert len(list((tmp_path / _fs.SPARE_DIR).iterdir())) == 1  # the released one, not dropped
    lent.returned(None, None)
    lent.drop()  # the script ended: what it still held is removed, not kept
    assert not files[2].exists() and len(lent) == 0
    assert len(list((tmp_path / _fs.SPARE_DIR).iterdir())) == 1


def test_the_script_releases_a_model_file_when_its_last_tensor_goes(tmp_path) -> None:
    import gc

    import torch

    from fedctl.codec import tensorfiles as tf

    released: list[str] = []
    tf.save_file({"a": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "m")
    tensors = tf.load_file(tmp_path / "m", on_release=lambda: released.append("m"))[0]
    keep = tensors["a"][1:]  # a view outlives the dict
    del tensors
    gc.collect()
    assert released == [] and keep.tolist() == [1.0, 1.0]
    del keep
    gc.collect()
    assert released == ["m"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_model_held_when_the_script_forks_is_dropped_not_released(tmp_path) -> None:
    """A child forked while the script held a received model may map it still: the agent is
    told to remove that file, not to rewrite it in place; a model received after the fork is
    released as usual."""
    import gc

    import torch

    from fedctl.client.agent_channel import HeldModels
    from fedctl.codec import tensorfiles as tf

    held = HeldModels()
    for name in ("a", "b"):
        tf.save_file({"w": torch.ones(4)}, tmp_path / name)
    first = held.load(str(tmp_path / "a"))
    pid = os.fork()
    if pid == 0:  # the child: nothing to do
        os._exit(0)
    os.waitpid(pid, 0)
    second = held.load(str(tmp_path / "b"))
    assert held.take() == (None, None)
    del first, second
    gc.collect()
    assert held.take() == ([str(tmp_path / "b")], [str(tmp_path / "a")])
    assert held.take() == (None, None)


def test_a_killed_processs_socket_folder_is_removed_by_the_next_process(tmp_path) -> None:
    """Unix sockets live in ``fedctl-<pid>-*`` in the temporary folder; a process killed with
    no chance to clean up (SIGKILL) leaves its folder, which the next process that makes its
    own removes once it is old, while a live process's folder is kept."""
    import signal
    import subprocess
    import sys
    import time

    from fedctl._fs import STALE_AFTER

    make = (
        "import os, signal\n"
        "from fedctl.transport.local import listen_unix, socket_path\n"
        "p = socket_path('site-1-job')\n"
        "listen_unix(p)\n"
        "print(os.getpid(), p.parent.name, flush=True)\n"
        "if os.environ.get('DIE'): os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.run(
        [sys.executable, "-c", make], env={**env, "DIE": "1"}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL
    pid, name = killed.stdout.split()
    left = tmp_path / name
    assert name.startswith(f"fedctl-{pid}-") and left.is_dir()
    assert list(left.iterdir())  # the socket is still there
    live = tmp_path / f"fedctl-{os.getpid()}-live"  # this process's: alive
    live.mkdir()
    old = time.time() - STALE_AFTER - 60
    for d in (left, live):
        os.utime(d, (old, old))
    clean = subprocess.run([sys.executable, "-c", make], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    assert not left.exists()  # swept
    assert live.exists()
    assert [p.name for p in tmp_path.iterdir()] == [live.name]  # its own removed at its exit


def test_socket_names_fit_a_long_temporary_folder_or_the_error_says_so(monkeypatch) -> None:
    """A unix socket's path is at most 107 bytes: under a long TMPDIR a socket's name keeps
    its last characters (where a job's token is), and a folder too long for any name is one
    clear error naming TMPDIR."""
    import shutil
    import tempfile

    from fedctl.errors import UsageError
    from fedctl.transport import local

    name = "hospital-a-" + "x" * 40 + "-0123abcd"
    base = Path(tempfile.mkdtemp(prefix="s-", dir="/tmp"))  # short, whatever tmp_path is
    try:
        long_dir = base / ("d" * (60 - len(str(base)) - 1))  # 60 bytes in all
        too_long = base / ("e" * (95 - len(str(base)) - 1))
        long_dir.mkdir()
        too_long.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
        monkeypatch.setattr(local, "_socket_dir", None)
        path = local.socket_path(name)
        assert len(os.fsencode(path)) <= 107  # Linux: 108 bytes with the terminating NUL
        assert path.name.endswith("-0123abcd.sock") and len(path.name) < len(name) + 5
        local.listen_unix(path).close()  # the kernel takes it
        wide = local.socket_path("hôpital-" + "é" * 40 + "-0123abcd")  # 2 bytes a letter
        assert len(os.fsencode(wide)) <= 107 and wide.name.endswith("-0123abcd.sock")
        local.listen_unix(wide).close()
        monkeypatch.setattr(tempfile, "tempdir", str(too_long))
        monkeypatch.setattr(local, "_socket_dir", None)
        with pytest.raises(UsageError, match="too long a path for unix sockets.*set TMPDIR"):
            local.socket_path(name)
    finally:
        shutil.rmtree(base, ignore_errors=True)
