"""Algorithms end to end in the simulator: FedProx mu=0 is FedAvg, FedNova with equal steps is
FedAvg, SCAFFOLD's control variates persist over 200 sites on 2 workers, FedBN keeps local
batch-norm values, sampling is reproducible, the cross-site matrix, and every example recipe."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fedctl.cli.main import main
from fedctl.client.state import SiteState
from fedctl.codec.tensorfiles import load_file
from fedctl.datasets import make_shard
from fedctl.recipe import (
    FedAvgRecipe,
    FedNovaRecipe,
    SimEnv,
    load_recipe,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _local(tmp_path: Path, n: int, **kw) -> SimEnv:
    return SimEnv(num_clients=n, backend="local", workspace=tmp_path, display="none", **kw)


def test_fedprox_with_mu_zero_is_fedavg(tmp_path: Path) -> None:
    prox = load_recipe(RECIPES / "fedprox").recipe.with_overrides(
        num_rounds=2, train_args="--epochs 1", mu=0.0
    )
    spec = {k: v for k, v in prox.to_spec().items() if k != "mu"}
    avg = FedAvgRecipe(**spec, model=prox.model, base_dir=prox.base_dir)
    env = _local(tmp_path, 3, seed=4)
    runs = [r.run(env) for r in (prox, avg)]
    assert all(r.ok for r in runs), [r.reason for r in runs]
    assert _same(runs[0].load_final(), runs[1].load_final())
    pulled = prox.with_overrides(mu=1.0).run(env)
    assert not _same(pulled.load_final(), runs[1].load_final())


def test_fednova_with_equal_steps_is_fedavg(tmp_path: Path) -> None:
    nova = load_recipe(RECIPES / "fednova").recipe.with_overrides(
        num_rounds=2, train_args="--quantity-skew 0 --epochs 1"
    )
    spec = {k: v for k, v in nova.to_spec().items() if k != "local_momentum"}
    avg = FedAvgRecipe(**spec, model=nova.model, base_dir=nova.base_dir)
    assert isinstance(nova, FedNovaRecipe)
    env = _local(tmp_path, 3, seed=2)
    a, b = nova.run(env), avg.run(env)
    assert a.ok and b.ok
    steps = {s["metrics"]["local_steps"] for s in _lines(a.result_dir / "metrics/sites.jsonl")}
    assert len(steps) == 1  # every site ran the same number of steps
    final_a, final_b = a.load_final(), b.load_final()
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_scaffold_state_survives_rounds_with_200_sites_on_2_workers(
    ray_cluster, tmp_path: Path
) -> None:
    recipe = load_recipe(RECIPES / "scaffold").recipe.with_overrides(
        num_rounds=2, train_args="--epochs 1"
    )
    env = SimEnv(num_clients=200, workers=2, workspace=tmp_path, display="none", checkpoint=True)
    run = recipe.run(env)
    assert run.ok, run.reason
    assert run.extra["resident"] is False and [r["accepted"] for r in run.metrics] == [200, 200]
    info = json.loads((run.result_dir / "checkpoint/checkpoint.json").read_text())
    saved = load_file(run.result_dir / "checkpoint" / info["model"])[0]
    c = {k[len("d:c/") :]: v for k, v in saved.items() if k.startswith("d:c/")}
    assert set(c) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
    # With every site in every round, SCAFFOLD keeps c = mean of the sites' c_i. That holds
    # after round 2 only if each c_i from round 1 came back from the site state in round 2.
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c.items()}
    for i in range(1, 201):
        state = SiteState(run.result_dir / f"sites/site-{i}/state.safetensors")
        for k in total:
            total[k] += state[f"scaffold.ci:{k}"].double()
    for k, v in c.items():
        assert v.abs().max() > 0
        assert torch.allclose(total[k] / 200, v.double(), atol=1e-5), k


def test_10000_virtual_sites_keep_state_only_for_the_sampled_ones(tmp_path: Path) -> None:
    """Per-site state is spilled to the run folder: a site never sampled has nothing anywhere,
    a site sampled twice gets its own control variate back (bench/bench_scale.py measures the
    memory and round time of 10,000 against 1,000 sites)."""
    recipe = load_recipe(RECIPES / "scaffold").recipe.with_overrides(
        num_rounds=3, min_clients=4, sample_clients=4, train_args="--epochs 1"
    )
    run = recipe.run(_local(tmp_path, 10_000))
    assert run.ok, run.reason
    trained = [
        {s["site"] for s in _lines(run.result_dir / "metrics/sites.jsonl") if s["round"] == r}
        for r in range(1, 4)
    ]
    assert [len(t) for t in trained] == [4, 4, 4]
    folders = {p.name for p in (run.result_dir / "sites").iterdir()}
    assert folders == set().union(*trained)  # 12 at most of 10,000
    for site in folders:
        state = SiteState(run.result_dir / f"sites/{site}/state.safetensors")
        assert state["scaffold.ci:layers.0.weight"].abs().max() > 0


def test_fedbn_keeps_local_batch_norm_values_across_rounds(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "personalization").recipe.with_overrides(
        num_rounds=3, train_args="--epochs 1"
    )
    run = recipe.run(_local(tmp_path, 3))
    assert run.ok, run.reason
    initial, final = recipe.initial_params(), run.load_final()
    bn = [k for k in initial if k.startswith("body.1.")]
    assert all(torch.equal(final[k], initial[k]) for k in bn)  # never averaged
    assert not torch.equal(final["body.0.weight"], initial["body.0.weight"])  # shared: trained
    means = []
    for i in range(1, 4):
        state = SiteState(run.result_dir / f"sites/site-{i}/state.safetensors")
        shard = make_shard(i - 1, 3, alpha=1.0, feature_skew=1.0, noise=1.5)
        # batches seen over all three rounds: the site's BN counters came back every round
        steps = math.ceil(shard.num_train / 32)
        assert state["personal:body.1.num_batches_tracked"].item() == 3 * steps
        means.append(state["personal:body.1.running_mean"])
    assert not torch.equal(means[0], means[1]) and not torch.equal(means[1], means[2])


def test_sampling_is_reproducible_in_simulation(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "fedopt" / "fedavgm.py").recipe.with_overrides(
        num_rounds=3, train_args="--epochs 1", sample_clients=3
    )

    def participants(seed: int) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
        run = recipe.run(_local(tmp_path, 8, seed=seed))
        assert run.ok, run.reason
        rows = _lines(run.result_dir / "metrics/sites.jsonl")
        return [sorted(r["site"] for r in rows if r["round"] == k) for k in (1, 2, 3)], (
            run.load_final()
        )

    sites_a, model_a = participants(5)
    sites_b, model_b = participants(5)
    assert sites_a == sites_b and _same(model_a, model_b)
    assert all(len(s) == 3 for s in sites_a) and len({tuple(s) for s in sites_a}) > 1
    assert participants(6)[0] != sites_a


TOY_CLIENT = """
import torch
import fedctl.client as flare

flare.init()
idx = flare.get_site_index()
while flare.is_running():
    received = flare.receive()
    if flare.is_submit_model():
        flare.send(flare.FLModel(params={"w": torch.full((2,), float(idx + 1))}))
    elif flare.is_evaluate():
        value = float(received.params["w"][0]) * 10 + idx + 1
        flare.send(flare.FLModel(metrics={"score": value}, meta={"NUM_SAMPLES": 1}))
    else:
        w = received.params["w"] + 0.5
        flare.send(flare.FLModel(params={"w": w}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def test_cross_site_matrix_of_a_toy_model_in_simulation(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "client.py").write_text(TOY_CLIENT)
    recipe = FedAvgRecipe(
        "toy-xsite",
        3,
        2,
        {"w": torch.zeros(2)},
        "client.py",
        cross_site_eval=True,
        key_metric=None,
        base_dir=folder,
    )
    run = recipe.run(SimEnv(num_clients=3, backend="local", workspace=tmp_path, display="plain"))
    assert run.ok, run.reason
    matrix = json.loads((run.result_dir / "cross_site_eval.json").read_text())
    assert matrix["models"] == ["global", "site-1", "site-2", "site-3"]
    assert matrix["sites"] == ["site-1", "site-2", "site-3"]
    for j, site in enumerate(matrix["sites"]):
        assert matrix["results"]["global"][site]["score"] == pytest.approx(1.0 * 10 + j + 1)
        for i, owner in enumerate(matrix["models"][1:]):
            assert matrix["results"][owner][site]["score"] == (i + 1) * 10 + j + 1
    assert matrix["errors"] == {"submit_model": {}, "evaluate": {}}
    err = capsys.readouterr().err
    assert "cross-site evaluation (score)" in err and "site-3" in err
    assert (run.result_dir / "models/local-site-2.safetensors").is_file()
    log = (run.result_dir / "run.log").read_text()
    assert "cross-site evaluation saved to" in log and "model \\ data" in log


EXAMPLES = [
    ("fedprox", 4),
    ("scaffold", 4),
    ("fednova", 4),
    ("fedopt", 4),
    ("fedopt/fedyogi.py", 3),
    ("fedopt/fedadagrad.py", 3),
    ("fedopt/fedavgm.py", 4),
    ("robust", 5),
    ("robust/median.py", 4),
    ("personalization", 3),
    ("personalization/fedper.py", 3),
    ("evaluation", 3),
    ("async/fedbuff.py", 4),
    ("async/fedasync.py", 4),
    ("swarm", 3),
    ("cyclic", 3),
]


@pytest.mark.parametrize(("path", "clients"), EXAMPLES, ids=[p for p, _ in EXAMPLES])
def test_example_recipes_run_from_the_cli(tmp_path: Path, capsys, path: str, clients: int) -> None:
    code = main(
        [
            "simulate",
            str(RECIPES / path),
            "--backend",
            "local",
            "--clients",
            str(clients),
            "--rounds",
            "2",
            "--workspace",
            str(tmp_path),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)["result"]
    assert code == 0 and out["status"] == "FINISHED", out["reason"]
    assert out["rounds_completed"] == 2
    # nothing of the run's job stays importable in this process (an asynchronous run replaces
    # its in-process worker when it cancels tasks: the replaced one is closed too)
    run_files = str(tmp_path)
    modules = sys.modules.copy().items()
    left = [n for n, m in modules if run_files in str(getattr(m, "__file__", ""))]
    assert left == [] and not any(run_files in p for p in sys.path), left
