"""Asynchronous aggregation (issue 16, deliverables 1, 2 and 5): FedAsync and FedBuff against a
framework-free event loop over the same virtual clock, FedBuff = FedAvg bit for bit when the
buffer is every site and speeds are equal, the staleness functions' golden values, stale updates
dropped and logged, simulated dropout, and the same job on a POC with a site killed mid-run."""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import pytest
import torch
from conftest import local_sim

from fedctl.errors import RecipeError, UsageError
from fedctl.recipe import FedAsyncRecipe, FedAvgRecipe, FedBuffRecipe, SimEnv, load_recipe
from fedctl.workflows.asynchronous import staleness_weight
from fedctl.workflows.clock import SpeedModel, VirtualClock

REPO = Path(__file__).resolve().parent.parent

CLIENT = """
import os
import signal
import sys
import time
import fedctl.client as flare

flare.init()
site = flare.get_site_name()
number = int(site.split("-")[1])
tasks = 0
while flare.is_running():
    received = flare.receive()
    tasks += 1
    params = {k: v + 0.1 * number for k, v in received.params.items()}  # "training"
    if flare.system_info()["mode"] != "simulation":
        time.sleep(0.2 * number)  # real sites: speeds differ
        if site == "site-3" and len(sys.argv) > 1 and tasks == 2:  # its agent dies mid-run
            os.kill(int(sys.argv[1]), signal.SIGKILL)
            time.sleep(60)
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": number}))
"""
FACTORS = {"site-1": 1.0, "site-2": 2.5, "site-3": 4.0}


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "client.py").write_text(CLIENT)
    return folder


def _model() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(3, 2), "b": torch.randn(2)}


def _recipe(cls, folder: Path, **kw):
    args = {"name": "async", "min_clients": 3, "num_rounds": 6, "key_metric": None, **kw}
    return cls(model=_model(), train_script="client.py", base_dir=folder, **args)


def _reference(
    mode: str,
    rounds: int,
    *,
    k: int = 1,
    alpha: float = 0.6,
    a: float = 0.5,
    max_staleness: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A plain event loop: sites with the FACTORS above, each task one virtual time unit ×
    factor; sites that return are given the current model once every result due at that moment
    is in, or at once when theirs completed a new model. Returns the model and each update's
    staleness (-1: dropped)."""
    x = {k_: v.double() for k_, v in _model().items()}
    version, bases, buffer = 0, {0: x}, []
    flights = [(f, site, 0) for site, f in FACTORS.items()]
    heapq.heapify(flights)
    seen, idle = [], []
    while version < rounds:
        t, site, tau = heapq.heappop(flights)
        before = version
        number = int(site.split("-")[1])
        stale = version - tau
        if max_staleness is not None and stale > max_staleness:
            seen.append(-1)
        else:
            seen.append(stale)
            y = {k_: v + 0.1 * number for k_, v in bases[tau].items()}
            s = (stale + 1) ** -a
            if mode == "fedasync":
                x = {k_: (1 - alpha * s) * x[k_] + alpha * s * y[k_] for k_ in x}
                version += 1
            else:
                buffer.append(({k_: y[k_] - bases[tau][k_] for k_ in x}, s, float(number)))
                if len(buffer) == k:
                    total = sum(w for _, _, w in buffer)
                    x = {k_: x[k_] + sum(w * s_ * d[k_] for d, s_, w in buffer) / total for k_ in x}
                    version, buffer = version + 1, []
            bases[version] = x
        idle.append(site)
        if version > before or not (flights and flights[0][0] == t):
            for s_ in idle:
                heapq.heappush(flights, (t + FACTORS[s_], s_, version))
            idle = []
    return {k_: v.float() for k_, v in x.items()}, seen


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize(
    ("kind", "staleness", "expected"),
    [
        ("constant", 7, 1.0),
        ("polynomial", 0, 1.0),
        ("polynomial", 3, 0.5),  # FedBuff's 1/sqrt(1 + 3)
        ("polynomial", 8, 1 / 3),
        ("hinge", 4, 1.0),  # a = 10, b = 4: 1 up to b
        ("hinge", 6, 1 / 21),  # 1 / (10 · (6 − 4) + 1)
    ],
)
def test_staleness_functions_golden_values(kind, staleness, expected) -> None:
    a = 10.0 if kind == "hinge" else 0.5
    assert staleness_weight(kind, staleness, a, 4.0) == pytest.approx(expected, rel=1e-12)


def test_an_unknown_staleness_function_is_refused() -> None:
    with pytest.raises(ValueError, match="staleness must be one of constant, polynomial, hinge"):
        staleness_weight("linear", 1)


@pytest.mark.parametrize("mode", ["fedasync", "fedbuff"])
def test_async_equals_the_framework_free_event_loop(job, tmp_path, mode) -> None:
    if mode == "fedasync":
        recipe = _recipe(FedAsyncRecipe, job, num_rounds=8, alpha=0.6)
        expected, stale = _reference("fedasync", 8)
    else:
        recipe = _recipe(FedBuffRecipe, job, num_rounds=5, buffer_size=2)
        expected, stale = _reference("fedbuff", 5, k=2)
    assert max(stale) >= 2  # the slow sites' updates really were stale
    run = recipe.run(local_sim(tmp_path, "sim", 3, speeds={"factors": FACTORS}))
    assert run.ok, run.reason
    assert _close(run.load_final(), expected)
    # the virtual clock: the last model is made when the update that completed it arrives
    assert [m["sim_time"] > 0 for m in run.metrics] == [True] * len(run.metrics)
    assert run.metrics[-1]["sim_time"] <= 8 * max(FACTORS.values())


def test_stale_updates_beyond_max_staleness_are_dropped_and_logged(job, tmp_path) -> None:
    recipe = _recipe(FedAsyncRecipe, job, num_rounds=8, max_staleness=1)
    expected, stale = _reference("fedasync", 8, max_staleness=1)
    assert -1 in stale
    run = recipe.run(local_sim(tmp_path, "sim", 3, speeds={"factors": FACTORS}))
    assert run.ok, run.reason
    assert _close(run.load_final(), expected)
    log = (run.result_dir / "run.log").read_text()
    assert "update is stale by" in log and "(max_staleness 1); dropped" in log


def test_fedbuff_with_every_site_and_equal_speeds_is_fedavg_bit_for_bit(tmp_path) -> None:
    example = load_recipe(REPO / "recipes" / "async" / "fedbuff.py").recipe
    spec = {
        "name": "x",
        "min_clients": 4,
        "num_rounds": 3,
        "train_script": "client.py",
        "train_args": example.train_args,
        "key_metric": None,
        "base_dir": example.base_dir,
    }
    model = example.model
    buff = FedBuffRecipe(model=model, buffer_size=4, **spec)
    avg = FedAvgRecipe(model=model, **spec)
    for backend in ("local", "ray"):
        env = {"num_clients": 4, "display": "none", "backend": backend, "seed": 3}
        a = buff.run(SimEnv(workspace=tmp_path / f"buff-{backend}", **env))
        b = avg.run(SimEnv(workspace=tmp_path / f"avg-{backend}", **env))
        assert a.ok and b.ok, (a.reason, b.reason)
        fa, fb = a.load_final(), b.load_final()
        assert all(torch.equal(fa[k], fb[k]) for k in fa), backend
        assert [m["accepted"] for m in a.metrics] == [4, 4, 4]


def test_the_same_seed_gives_the_same_run_and_dropout_is_simulated(job, tmp_path) -> None:
    speeds = {"spread": 10.0, "jitter": 0.3, "dropout": 0.5}
    recipe = _recipe(FedBuffRecipe, job, num_rounds=6, buffer_size=2)
    a = recipe.run(local_sim(tmp_path, "a", 3, speeds=speeds, seed=4))
    b = recipe.run(local_sim(tmp_path, "b", 3, speeds=speeds, seed=4))
    assert a.ok and b.ok, (a.reason, b.reason)
    fa, fb = a.load_final(), b.load_final()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert [m["sim_time"] for m in a.metrics] == [m["sim_time"] for m in b.metrics]
    sites = [
        json.loads(x) for x in (a.result_dir / "metrics/sites.jsonl").read_text().split("\n") if x
    ]
    dropped = [s for s in sites if not s["ok"]]
    assert dropped and all("simulated dropout" in s["error"] for s in dropped)


def test_fedavg_rounds_take_their_slowest_site_in_simulated_time(job, tmp_path) -> None:
    recipe = _recipe(FedAvgRecipe, job, num_rounds=2)
    run = recipe.run(local_sim(tmp_path, "sim", 3, speeds={"factors": FACTORS, "latency": 0.5}))
    assert run.ok, run.reason
    assert [m["sim_time"] for m in run.metrics] == [5.0, 10.0]  # 4 + 2 × 0.5 per round


def test_the_virtual_clock_is_seeded_per_site_and_task() -> None:
    model = SpeedModel.from_spec({"spread": 10.0, "jitter": 0.5}, ["site-1", "site-2"])
    a, b = VirtualClock(model, 1), VirtualClock(model, 1)
    first = [a.schedule("site-1"), a.schedule("site-2"), a.schedule("site-1")]
    # the other order: each site's draws do not depend on the others'
    second = [b.schedule("site-2"), b.schedule("site-1"), b.schedule("site-1")]
    assert first[0] == second[1] and first[1] == second[0] and first[2] == second[2]
    assert 1.0 <= a.factor("site-1") <= 10.0 and a.factor("site-1") != a.factor("site-2")
    assert VirtualClock(model, 2).factor("site-1") != a.factor("site-1")


@pytest.mark.parametrize(
    ("speeds", "match"),
    [
        ({"sprad": 2}, "speeds: unknown key 'sprad'"),
        ({"spread": 0.5}, r"speeds: spread must be in \[1.0"),
        ({"dropout": 1.0}, r"speeds: dropout must be in \[0.0, 0.99\]"),
        ({"factors": {"site-9": 1.0}}, "speeds: factors names 'site-9', which is not a site"),
        ({"factors": {"site-1": 0}}, r"speeds: factors\['site-1'\] must be positive"),
        ({"latency": "fast"}, "speeds: latency must be a number"),
    ],
)
def test_bad_speed_models_are_one_line_errors(speeds, match) -> None:
    with pytest.raises(UsageError, match=match):
        SimEnv(num_clients=2, speeds=speeds)


@pytest.mark.parametrize(
    ("cls", "changes", "match"),
    [
        (FedBuffRecipe, {"sample_clients": 2}, "fedbuff does not take sample_clients"),
        (FedAsyncRecipe, {"federated_eval": True}, "fedasync does not take federated_eval"),
        (FedBuffRecipe, {"secure_aggregation": True}, "fedbuff does not take secure_aggregation"),
        (FedBuffRecipe, {"buffer_size": 0}, "buffer_size must be a positive integer"),
        (FedBuffRecipe, {"server_lr": -1}, "server_lr must be a positive number"),
        (FedAsyncRecipe, {"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
        (FedAsyncRecipe, {"staleness": "linear"}, "staleness must be one of"),
        (FedAsyncRecipe, {"max_staleness": -1}, "max_staleness must be an integer ≥ 0"),
        (FedBuffRecipe, {"concurrency": 0}, "concurrency must be a positive integer"),
    ],
)
def test_what_an_asynchronous_job_cannot_take_is_refused(job, cls, changes, match) -> None:
    with pytest.raises(RecipeError, match=match):
        _recipe(cls, job, **changes)


def test_poc_runs_fedasync_and_fedbuff_which_survives_a_site_killed_mid_run(job, tmp_path) -> None:
    from conftest import free_port

    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    ws = tmp_path / "poc"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port())
    poc.start(ws)
    try:
        recipe = _recipe(
            FedBuffRecipe,
            job,
            num_rounds=8,
            min_clients=2,
            buffer_size=2,
            round_timeout=60,
            train_args=str(poc.status(ws)["processes"]["site-3"]["pid"]),  # site-3's agent
        )
        env = PocEnv(workspace=ws, display="none", results=tmp_path / "res")
        mixed = _recipe(FedAsyncRecipe, job, num_rounds=6, min_clients=3, max_staleness=2).run(env)
        assert mixed.ok, mixed.reason  # FedAsync: every update a new model, in arrival order
        assert [m["accepted"] for m in mixed.metrics] == [1] * 6
        run = recipe.run(env)
        assert run.ok, run.reason
        assert len(run.metrics) == 8 and all(m["accepted"] == 2 for m in run.metrics)
        records = [
            json.loads(x) for x in (run.result_dir / "metrics/sites.jsonl").read_text().splitlines()
        ]
        done = [r["site"] for r in records if r["ok"]]
        assert done.count("site-3") == 1  # killed while on its second task
        assert done.count("site-1") > done.count("site-2") > 1  # the faster, the more updates
        server_log = (ws / "logs" / "server.log").read_text()
        gone = server_log.index("site site-3 disconnected")
        assert gone < server_log.index(f"job {run.job_id} FINISHED")  # it died mid-run
    finally:
        poc.stop(ws)


def test_concurrency_one_takes_the_sites_in_turn_with_no_staleness(job, tmp_path) -> None:
    """concurrency=1: one site trains at a time, the others wait in a first-in first-out queue,
    so every update is fresh: x ← (1 − α)·x + α·(x + 0.1·n) = x + 0.1·α·n."""
    recipe = _recipe(FedAsyncRecipe, job, num_rounds=6, concurrency=1, alpha=0.5)
    run = recipe.run(local_sim(tmp_path, "sim", 3, speeds={"factors": FACTORS}))
    assert run.ok, run.reason
    sites = [
        json.loads(x)["site"]
        for x in (run.result_dir / "metrics/sites.jsonl").read_text().splitlines()
    ]
    assert sites[:3] == sites[3:] and sorted(sites[:3]) == ["site-1", "site-2", "site-3"]
    expected = {k: v + 0.1 * 0.5 * 12 for k, v in _model().items()}  # each site twice: 2·(1+2+3)
    assert _close(run.load_final(), expected)
    assert run.metrics[-1]["sim_time"] == 2 * sum(FACTORS.values())  # one at a time
