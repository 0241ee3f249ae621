"""A per-round script's result shares its pages with the script's own tensors (fedctl.sim.remap):
the snapshot stays what was sent, the script's tensors keep their values and take later writes,
nothing the user mapped is touched, and nothing outlives the script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedctl.recipe import SimEnv, load_recipe
from fedctl.sim import remap
from fedctl.sim.procs import FileTransport

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux")

MIB = 1 << 20
#: above glibc's largest mmap threshold: such tensors always get their own anonymous mapping
#: (smaller ones may come from the heap, which is never remapped)
BIG = 10 * MIB  # elements of float32: 40 MiB


def _mapped_from(folder: Path, addr: int) -> bool:
    """Whether the page at ``addr`` is mapped from a file in ``folder``."""
    for lo, hi, _, _, path in remap._maps() or []:
        if lo <= addr < hi:
            return path.startswith(f"{folder}/")
    return False


def _rss_anon() -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(r"RssAnon:\s+(\d+) kB", text)
    assert found
    return int(found.group(1)) * 1024


def test_a_sent_tensor_shares_its_pages_with_the_snapshot_and_keeps_later_writes(tmp_path) -> None:
    transport = FileTransport(tmp_path)
    big = torch.randn(BIG)
    base = torch.randn(BIG + 7)  # odd length: its last page is only partly its own
    params = {
        "big": big,
        "tied": big,  # the same tensor under two names (tied weights)
        "slice": base[5:],  # starts inside a page, at a storage offset
        "strided": torch.randn(1024, 1024).t(),  # not contiguous: sent as a copy
        "small": torch.randn(10),
        "count": torch.arange(300_000, dtype=torch.int64),
    }
    sent = {k: v.clone() for k, v in params.items()}
    anon_before = _rss_anon()
    handle = transport.snapshot(dict(params), in_place=True)
    assert handle[0] == "result" and len(handle) == 4
    # the script's tensors are unchanged, and their pages now come from the result's file
    assert all(torch.equal(params[k], sent[k]) for k in sent)
    assert _mapped_from(tmp_path, big.data_ptr() + MIB)
    assert _mapped_from(tmp_path, params["slice"].data_ptr() + MIB)
    assert not _mapped_from(tmp_path, params["small"].data_ptr())
    assert anon_before - _rss_anon() > 40 * MIB  # one copy in memory, not two
    # the script changes its tensors after send(): the snapshot does not see it
    with torch.no_grad():
        big.mul_(-3.0).add_(1.0)
        base.zero_()
    got = transport.get(handle)
    assert all(torch.equal(got[k], sent[k]) for k in sent), "the snapshot changed"
    assert list(tmp_path.iterdir()) == []  # read once, by the driver
    assert torch.equal(big, sent["big"] * -3.0 + 1.0) and not base.any()
    del got
    # the script ended but kept its tensors: they get their own memory back, values intact
    moved = transport.release()
    assert moved >= 40 * MIB
    assert not remap.mapped(f"{tmp_path}/")
    assert torch.equal(big, sent["big"] * -3.0 + 1.0) and not base.any()
    assert transport.release() == 0


def test_only_the_allocators_memory_is_remapped(tmp_path) -> None:
    # a tensor over a file the user mapped shared: their later writes must still reach it
    user_file = tmp_path / "user.bin"
    n = 2 * MIB
    mine = torch.from_file(str(user_file), shared=True, size=n, dtype=torch.float32)
    mine.copy_(torch.arange(n, dtype=torch.float32))
    folder = tmp_path / "t"
    folder.mkdir()
    transport = FileTransport(folder)
    handle = transport.snapshot({"w": mine}, in_place=True)
    assert not _mapped_from(folder, mine.data_ptr() + MIB)
    mine[0] = -1.0
    again = torch.from_file(str(user_file), shared=False, size=n, dtype=torch.float32)
    assert again[0].item() == -1.0  # the write reached the user's file
    assert transport.get(handle)["w"][0].item() == 0.0
    # without in_place (a resident script), nothing is remapped
    own = torch.randn(BIG)
    transport.get(transport.snapshot({"w": own}))
    assert not _mapped_from(folder, own.data_ptr() + MIB)


def test_a_process_short_of_mappings_only_copies(monkeypatch) -> None:
    big = torch.randn(BIG)
    assert remap.plan([(big.data_ptr(), big.numel() * 4)])
    monkeypatch.setattr(remap, "_headroom", lambda count: remap.MAP_HEADROOM)
    assert remap.plan([(big.data_ptr(), big.numel() * 4)]) == []
    assert remap.plan([(big.data_ptr(), remap.MIN_BYTES - 1)]) == []


@pytest.mark.parametrize("offsets", [[3], [-64], ["0"], [0, 64]])
def test_a_result_with_unusable_offsets_is_refused(tmp_path, offsets) -> None:
    transport = FileTransport(tmp_path)
    handle = transport.snapshot({"w": torch.randn(100_000)})
    with pytest.raises(ValueError, match="offset"):
        transport.get((*handle, offsets))


#: a per-round client that takes its model from a cache in a helper module (one model per
#: worker process, reused by every site it runs), changes its tensors right after send(), and
#: logs whether its big tensor's pages came from the result's file after send()
_CLIENT = """
import sys

import torch

import fedctl.client as flare

sys.path.insert(0, {helpers!r})
from wide_cache import get_model


def from_result_file(addr):
    with open("/proc/self/maps") as f:
        for row in f:
            parts = row.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                return "/fedctl-" in (parts[5] if len(parts) > 5 else "")
    return False


flare.init()
idx = flare.get_site_index()
g = torch.Generator().manual_seed(100 + idx)
x = torch.randn(64, 4, generator=g)
y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1 * idx
model = get_model()
while flare.is_running():
    received = flare.receive()
    model.load_state_dict(received.params)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2 + idx % 3):
        batch = torch.randint(0, 64, (16,))
        opt.zero_grad()
        ((model(x[batch]).squeeze(1) - y[batch]) ** 2).mean().backward()
        opt.step()
    params = model.state_dict()
    flare.send(flare.FLModel(params=params, meta={{"NUM_STEPS_CURRENT_ROUND": 2 + idx % 3}}))
    print("SHARED", from_result_file(params["big"].data_ptr() + (1 << 20)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)
"""

_MODEL = """
import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.big = nn.Parameter(torch.linspace(-1, 1, 9_000_000))

    def forward(self, x):
        return self.fc(x) + self.big[:1] * 0.01
"""


def test_per_round_results_equal_the_local_backend_with_cached_and_changed_tensors(
    toy_dir, tmp_path
) -> None:
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "wide_cache.py").write_text(
        textwrap.dedent(
            """
            import functools

            from model import Toy


            @functools.lru_cache(maxsize=1)
            def get_model():
                return Toy()
            """
        )
    )
    (toy_dir / "model.py").write_text(_MODEL)
    (toy_dir / "client.py").write_text(_CLIENT.format(helpers=str(helpers)))
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=3, train_args="")

    def final(name: str, **kw) -> tuple[dict[str, torch.Tensor], Path]:
        run = recipe.run(SimEnv(num_clients=5, workspace=tmp_path / name, display="none", **kw))
        assert run.ok, run.reason
        return run.load_final(), run.result_dir

    local, _ = final("local", backend="local")
    got, run_dir = final("process", backend="process", workers=2)
    assert all(torch.equal(got[k], local[k]) for k in local)
    logs = [p.read_text() for p in run_dir.rglob("client.log")]
    assert len(logs) == 5
    shared = [line for text in logs for line in text.splitlines() if line.startswith("SHARED")]
    assert shared == ["SHARED True"] * 15, shared  # every send, also with the cached model
    assert (run_dir / "workers.log").read_text() == ""


def test_a_result_the_driver_cannot_read_fails_only_its_site(toy_dir, tmp_path) -> None:
    # site-2's worker hands over a result whose offsets are unusable (as a script that patches
    # the simulator's own code in its worker could): that site fails, the round goes on
    (toy_dir / "model.py").write_text(_MODEL)
    client = toy_dir / "client.py"
    client.write_text(
        client.read_text()
        .replace(
            "    flare.send(\n",
            "    import fedctl.sim.procs as _procs\n"
            "    _real = _procs.FileTransport.snapshot\n"
            "    if site == 'site-2' and rnd == 0:\n"
            "        _procs.FileTransport.snapshot = lambda self, p, **kw: (\n"
            "            *_real(self, p, **kw)[:3], [3] * len(p))\n"
            "    flare.send(\n",
        )
        .replace(
            "            meta=meta,\n        )\n    )\n",
            "            meta=meta,\n        )\n    )\n    _procs.FileTransport.snapshot = _real\n",
        )
    )
    assert "_procs.FileTransport.snapshot = _real" in client.read_text()
    recipe = load_recipe(toy_dir).recipe.with_overrides(num_rounds=2)
    env = SimEnv(num_clients=3, workers=1, backend="process", workspace=tmp_path, display="none")
    run = recipe.run(env)
    assert run.ok, run.reason
    assert run.metrics[0]["failed"] == ["site-2"] and run.metrics[1]["accepted"] == 3
    assert (
        "its result is unreadable: a result file's tensor offset 3"
        in (run.result_dir / "run.log").read_text()
    )
    assert list(Path("/dev/shm").glob(f"fedctl-{os.getpid()}-*")) == []


def test_a_worker_whose_remap_fails_ends_at_once() -> None:
    # mmap refused: the range may be a hole, so the worker process must not run on (its pool
    # replaces it and the site's task fails: tests/test_sim.py, a worker that dies)
    code = (
        "from fedctl.sim import remap\n"
        "remap._Libc.tried = True\n"
        "remap._Libc.fn = lambda *a: None\n"
        "remap.remap(-1, 4096, 4096, 0)\n"
        "print('ran on')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 70 and "ran on" not in done.stdout
    assert "fedctl: remapping a sent tensor failed" in done.stderr
