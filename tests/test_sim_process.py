"""The simulator's process backend (fedctl.sim.procs): no Ray, workers forked by a zygote, models
moved as shared-memory files, every process stopped by PID and every file removed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import hugepages
import psutil
import pytest
import torch
from fdtargets import fd_targets

from fedctl.errors import UsageError
from fedctl.recipe import SimEnv, load_recipe
from fedctl.sim.procs import FileTransport, SharedFile
from fedctl.sim.transport import INLINE_BYTES


def _pids(run_dir: Path) -> list[int]:
    found = re.search(r"worker processes \(pids ([\d, ]+)\)", (run_dir / "run.log").read_text())
    assert found, "the run log names its workers"
    return [int(p) for p in found.group(1).split(", ")]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _transport_dirs(*roots: Path, pid: int | None = None) -> list[Path]:
    pattern = f"fedctl-{pid if pid is not None else os.getpid()}-*"
    return [d for root in roots for d in root.glob(pattern)]


def _zygotes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "fedctl.sim.zygote" in " ".join(p.cmdline())]


def test_auto_picks_processes_unless_ray_is_wanted(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    assert SimEnv().resolved_backend() == "process"
    assert SimEnv(ray_address="auto").resolved_backend() == "ray"
    assert SimEnv(gpus=1).resolved_backend() == "ray"
    assert SimEnv(backend="local").resolved_backend() == "local"
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    assert SimEnv().resolved_backend() == "ray"  # this process already joined a Ray cluster
    assert SimEnv(backend="process").resolved_backend() == "process"
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert SimEnv().resolved_backend() == "ray"  # the process backend is Linux's


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"backend": "processes"}, "backend must be one of auto, process, ray, local"),
        ({"backend": "process", "ray_address": "auto"}, "ray_address needs backend='ray'"),
        ({"backend": "local", "ray_address": "auto"}, "ray_address needs backend='ray'"),
        ({"backend": "process", "gpus": 1}, "gpus needs backend='ray'"),
    ],
)
def test_bad_backend_settings_are_one_line_errors(env, message) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        SimEnv(**env)


def test_a_run_leaves_no_process_and_no_file(toy_recipe, tmp_path) -> None:
    run = toy_recipe.run(
        SimEnv(num_clients=3, workers=2, backend="process", workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    pids = _pids(run.result_dir)
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(_gone(pid) for pid in pids)
    assert _zygotes() == []
    assert _transport_dirs(Path("/dev/shm"), run.result_dir) == []
    assert (run.result_dir / "workers.log").read_text() == ""  # nothing went wrong in a worker


def test_large_results_equal_the_local_backend_bit_for_bit(toy_dir, tmp_path) -> None:
    # one 4.8 MB parameter: results go through files, not the batch's reply
    big = 1_200_000
    assert big * 4 > INLINE_BYTES
    (toy_dir / "model.py").write_text(
        textwrap.dedent(
            f"""
            import torch
            from torch import nn


            class Toy(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.fc = nn.Linear(4, 1)
                    self.big = nn.Parameter(torch.linspace(-1, 1, {big}))

                def forward(self, x):
                    return self.fc(x) + self.big[:1] * 0.01
            """
        )
    )
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=2)

    def final(**kw) -> dict[str, torch.Tensor]:
        run = recipe.run(SimEnv(num_clients=3, workspace=tmp_path, display="none", **kw))
        assert run.ok, run.reason
        return run.load_final()

    local = final(backend="local")
    for kw in ({"workers": 2}, {"workers": 3}):  # per-round and resident
        got = final(backend="process", **kw)
        assert all(torch.equal(got[k], local[k]) for k in local), kw
    assert _transport_dirs(Path("/dev/shm"), tmp_path) == []


def _fds_under(folder: Path) -> list[str]:
    """This process's open descriptors of files in ``folder`` (other threads' come and go)."""
    return [t for t in fd_targets() if t.startswith(f"{folder}/")]


def test_file_transport_round_trips_and_removes_its_files(tmp_path) -> None:
    transport = FileTransport(tmp_path)
    params = {
        "w": torch.randn(3, 5),
        "half": torch.randn(7).to(torch.bfloat16),
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    shared = transport.share(params)
    assert isinstance(shared, SharedFile)
    seen = transport.get(shared.wire)  # what a worker maps
    assert set(seen) == set(params)
    assert all(torch.equal(seen[k], params[k]) and seen[k].dtype == params[k].dtype for k in params)
    assert len(list(tmp_path.iterdir())) == 1
    # each script's own copy is copy-on-write: its writes reach neither the file nor the others
    mine, theirs = transport.private_copy(shared.wire), transport.private_copy(shared.wire)
    assert mine is not None and theirs is not None
    mine["w"].add_(1.0)
    mine["count"][0] = 99
    assert torch.equal(theirs["w"], params["w"]) and torch.equal(seen["w"], params["w"])
    assert theirs["count"][0].item() == 1
    assert torch.equal(transport.private_copy(shared.wire)["w"], params["w"])
    assert transport.private_copy(("inline", None)) is None  # the caller clones instead
    kept = [transport.private_copy(shared.wire) for _ in range(50)]
    assert _fds_under(tmp_path) == []  # a mapping holds no file descriptor
    del kept
    del shared  # the driver dropped the round's model: its file goes
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(seen["w"], params["w"])  # a mapping outlives its file

    big = {"x": torch.arange(INLINE_BYTES // 4 + 1, dtype=torch.float32)}
    small = transport.snapshot({"x": torch.ones(4)})
    assert small[0] == "inline" and list(tmp_path.iterdir()) == []
    handle = transport.snapshot(big)
    assert handle[0] == "result" and len(list(tmp_path.iterdir())) == 1
    big["x"].add_(1)  # changed after send(): the snapshot must not see it
    got = transport.get(handle)
    assert got["x"][0].item() == 0.0 and got["x"][-1].item() == INLINE_BYTES // 4
    assert list(tmp_path.iterdir()) == []  # a result is read once, by the driver


def test_the_zygote_ends_cleanly_when_its_driver_lets_go(tmp_path) -> None:
    # it skips the interpreter's shutdown (os._exit): still exit code 0, its folder removed, and
    # what it logged is in the log
    from fedctl.sim.procs import Zygote, transport_dir

    folder = transport_dir(tmp_path)
    log = tmp_path / "workers.log"
    zygote = Zygote(log, folder)
    try:
        pid, conn = zygote.fork()  # it serves: torch and the worker are imported
        conn.close()  # the worker ends without a config (EOF), printing its traceback
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid)
    finally:
        zygote.close()
    assert zygote.proc.returncode == 0
    assert not folder.exists()
    assert "EOFError" in log.read_text()


def test_a_lost_zygote_fails_the_run_with_one_line(toy_dir, tmp_path) -> None:
    client = toy_dir / "client.py"
    client.write_text(
        client.read_text().replace(
            "    rnd = received.current_round\n",
            "    rnd = received.current_round\n"
            "    if site == 'site-1' and rnd == 1:\n"
            "        import os, signal\n"
            "        os.kill(os.getppid(), signal.SIGKILL)\n"
            "        os._exit(3)\n",  # and its worker must be replaced: there is no zygote now
        )
    )
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=3)
    run = recipe.run(
        SimEnv(num_clients=2, workers=2, backend="process", workspace=tmp_path, display="none")
    )
    assert run.status == "FAILED"
    assert "the simulator's worker zygote" in (run.reason or ""), run.reason
    assert "\n" not in (run.reason or "")
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in _pids(run.result_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in _pids(run.result_dir))
    assert _transport_dirs(Path("/dev/shm"), run.result_dir) == []


def test_workers_end_when_their_driver_is_killed(toy_dir, tmp_path) -> None:
    workspace = tmp_path / "runs"
    code = (
        "from fedctl.recipe import SimEnv, load_recipe\n"
        f"r = load_recipe({str(toy_dir)!r}).recipe.with_overrides(num_rounds=1,"
        " train_args='--hang-sites site-1,site-2')\n"
        f"r.run(SimEnv(num_clients=2, workers=2, backend='process', workspace={str(workspace)!r},"
        " display='none'))\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        pids: list[int] = []
        while time.monotonic() < deadline and not pids:
            time.sleep(0.2)
            for log in workspace.glob("*/run.log"):
                if "worker processes (pids" in log.read_text():
                    pids = _pids(log.parent)
        assert pids, "the driver did not start its workers"
        zygote = psutil.Process(driver.pid).children()
        assert zygote
        time.sleep(1.0)  # the scripts are hanging now
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 15
        everyone = [*pids, *(z.pid for z in zygote)]
        while time.monotonic() < deadline and not all(_gone(p) for p in everyone):
            time.sleep(0.2)
        assert all(_gone(p) for p in everyone)
        assert _transport_dirs(Path("/dev/shm"), workspace, pid=driver.pid) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in locals().get("everyone", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_fit_workers_keeps_the_estimated_peak_in_the_memory_available() -> None:
    from fedctl.sim.env import fit_workers

    gb = 10**9
    assert fit_workers(4, 0, 8 * gb) == 4  # a small model: as many as asked
    assert fit_workers(8, 1 * gb, 32 * gb) == 7  # (25.6 − 3) GB / 3.2 GB per worker
    assert fit_workers(2, 4 * gb, 16 * gb) == 1  # never fewer than one


def test_a_large_model_trains_one_site_per_four_cpus() -> None:
    from fedctl.sim.env import LARGE_MODEL_BYTES, large_model_workers

    assert large_model_workers(2, LARGE_MODEL_BYTES - 1, 2) == 2  # below: one site per CPU
    assert large_model_workers(2, LARGE_MODEL_BYTES, 2) == 1
    assert large_model_workers(8, LARGE_MODEL_BYTES, 8) == 2
    assert large_model_workers(8, 10 * LARGE_MODEL_BYTES, 64) == 8  # never more than asked
    assert large_model_workers(1, LARGE_MODEL_BYTES, 1) == 1  # at least one


@pytest.mark.parametrize(
    ("why", "line"),
    [
        ("large model", "1 worker, not 2: a 0.0 GB model trains one site per 4 CPUs"),
        ("little memory", "1 worker, not 2: a site training a 0.0 GB model needs about"),
    ],
)
def test_a_run_with_fewer_workers_says_why_and_keeps_an_explicit_choice(
    why, line, toy_recipe, tmp_path, monkeypatch
) -> None:
    import fedctl.sim.env as sim_env
    import fedctl.sim.runner as runner

    monkeypatch.setattr(runner, "available_cpus", lambda: 2)
    if why == "large model":
        monkeypatch.setattr(sim_env, "LARGE_MODEL_BYTES", 1)  # the toy model counts as large
    else:
        monkeypatch.setattr(runner, "_available_memory", lambda: 300 * 2**20)
    env = SimEnv(num_clients=3, backend="process", workspace=tmp_path, display="none")
    assert env.resolved_workers() == 2
    run = toy_recipe.run(env)
    assert run.ok, run.reason
    assert run.extra["workers"] == 1
    assert line in (run.result_dir / "run.log").read_text()
    chosen = toy_recipe.run(
        SimEnv(num_clients=3, workers=2, backend="process", workspace=tmp_path, display="none")
    )
    assert chosen.extra["workers"] == 2  # what the user chose is kept


def test_a_dead_drivers_old_folder_is_removed_and_live_or_recent_ones_kept(tmp_path) -> None:
    import subprocess

    from fedctl._fs import STALE_AFTER, remove_stale

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that no longer runs
    old = time.time() - STALE_AFTER - 60
    dead_old = tmp_path / f"fedctl-{gone.pid}-abc"
    dead_recent = tmp_path / f"fedctl-{gone.pid}-def"
    alive_old = tmp_path / f"fedctl-{os.getpid()}-ghi"
    other = tmp_path / "fedctl-notapid-jkl"
    for d in (dead_old, dead_recent, alive_old, other):
        d.mkdir()
        (d / "model").write_bytes(b"x" * 10)
    for d in (dead_old, alive_old, other):
        os.utime(d, (old, old))
    target = tmp_path / "elsewhere"  # a link named like a dead process's folder is not followed
    target.mkdir()
    (target / "keep").write_bytes(b"x")
    link = tmp_path / f"fedctl-{gone.pid}-lnk"
    link.symlink_to(target)
    os.utime(link, (old, old), follow_symlinks=False)
    assert remove_stale(tmp_path) == [dead_old]
    assert not dead_old.exists()
    assert dead_recent.exists() and alive_old.exists() and other.exists()
    assert link.is_symlink() and (target / "keep").exists()


#: a per-round client script whose module-level function ties its globals into a reference cycle
#: (the common shape: ``def evaluate(...)`` next to the training loop), holding 64 MiB at module
#: level; it fails if an earlier script's memory is still alive in its worker when it starts
_LINGER_SCRIPT = """
import gc
import weakref

import torch
import tracker

import fedctl.client as flare

gc.disable()  # only the worker's own collection may free the cycle (the test's point)


def helper():  # its __globals__ is this script's namespace: a cycle
    return big


flare.init()
big = torch.ones(16 << 20)  # 64 MiB
alive = sum(r() is not None for r in tracker.refs)
tracker.refs.append(weakref.ref(big))
gc.enable()
if alive:
    raise RuntimeError(f"{alive} earlier scripts' memory is still alive in this worker")
while flare.is_running():
    received = flare.receive()
    flare.send(flare.FLModel(params=received.params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


@pytest.mark.parametrize("backend", ["process", "local"])
def test_a_per_round_script_leaves_no_memory_in_its_worker(toy_dir, tmp_path, backend) -> None:
    (toy_dir / "client.py").write_text(_LINGER_SCRIPT)
    (toy_dir / "tracker.py").write_text("refs = []\n")
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=2, train_args="")
    run = recipe.run(
        SimEnv(num_clients=3, workers=1, backend=backend, workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    assert run.extra["resident"] is False


def test_a_resident_script_that_ends_leaves_no_memory_for_its_successor(toy_dir, tmp_path) -> None:
    # resident (2 sites, 2 workers), but the script has no loop: it ends after each task and its
    # worker starts it again for the next round
    one_task = _LINGER_SCRIPT.replace(
        "while flare.is_running():\n    received", "if flare.is_running():\n    received"
    )
    assert one_task != _LINGER_SCRIPT
    (toy_dir / "client.py").write_text(one_task)
    (toy_dir / "tracker.py").write_text("refs = []\n")
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=3, train_args="")
    run = recipe.run(
        SimEnv(num_clients=2, workers=2, backend="process", workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    assert run.extra["resident"] is True


#: a per-round client script that fails if its worker still maps an earlier round's global model
#: when it starts (the worker maps the round's model file, and the script's copy is a mapping of
#: the same file: one file in all)
_MAPPED_SCRIPT = """
import re

import fedctl.client as flare

MODEL_FILE = re.compile(r"/fedctl-\\d+-[^/]+/\\d+-\\d+( \\(deleted\\))?$")


def model_files():
    names = set()
    with open("/proc/self/maps") as f:
        for row in f:
            path = row.rstrip("\\n").split(maxsplit=5)[-1]
            if MODEL_FILE.search(path):
                names.add(path.removesuffix(" (deleted)"))
    return names


def main():  # nothing the script receives is kept in its module's namespace
    while flare.is_running():
        received = flare.receive()
        mapped = model_files()
        if len(mapped) > 1:
            raise RuntimeError(f"the worker maps {len(mapped)} global models: {sorted(mapped)}")
        flare.send(flare.FLModel(params=received.params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))


flare.init()
main()
"""


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc")
def test_a_worker_maps_no_earlier_rounds_model(toy_dir, tmp_path) -> None:
    """The worker keeps the last script's host until the next one starts; the host must not
    keep the round's global model with it: with a 400 MB model, the previous round's stayed
    mapped through the next round's first site (0.4 GB more at the run's peak)."""
    (toy_dir / "client.py").write_text(_MAPPED_SCRIPT)
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=3, train_args="")
    run = recipe.run(
        SimEnv(num_clients=2, workers=1, backend="process", workspace=tmp_path, display="none")
    )
    assert run.ok, run.reason
    assert run.extra["resident"] is False


@hugepages.needs_thp
@pytest.mark.parametrize("setting, advised", [(None, True), ("0", False)])
def test_workers_back_large_tensors_with_huge_pages_unless_told_not_to(
    toy_dir, tmp_path, monkeypatch, setting, advised
) -> None:
    # fedctl.constants.SCRIPT_ENV_DEFAULTS: a worker's PyTorch asks for huge pages under tensors
    # of 2 MiB or more; the user's own THP_MEM_ALLOC_ENABLE wins
    if setting is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", setting)
    (toy_dir / "client.py").write_text(hugepages.CLIENT)
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=2, train_args="")
    env = SimEnv(num_clients=2, workers=1, backend="process", workspace=tmp_path, display="none")
    run = recipe.run(env)
    assert run.ok, run.reason
    logs = [p.read_text() for p in run.result_dir.rglob("client.log")]
    assert hugepages.reported(logs) == [f"HUGE_PAGES {advised}"] * 4
