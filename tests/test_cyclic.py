"""Cyclic weight transfer (issue 16, deliverable 3): the model visits every live site in turn,
the server never aggregates, a failing site is skipped with the reason; simulation and POC give
the framework-free sequence's model bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import local_sim

from fedctl.errors import RecipeError
from fedctl.recipe import CyclicRecipe

CLIENT = """
import argparse
import torch
import fedctl.client as flare

parser = argparse.ArgumentParser()
parser.add_argument("--fail", default="")
args = parser.parse_args()


def checksum(params):
    return float(sum((t.double() * torch.arange(1, t.numel() + 1).reshape(t.shape)).sum()
                     for t in params.values()))


flare.init()
site = flare.get_site_name()
number = int(site.split("-")[1])
while flare.is_running():
    received = flare.receive()
    if site in args.fail.split(","):
        raise RuntimeError(f"{site} fails on purpose")
    params = {k: v + 0.1 * number for k, v in received.params.items()}  # "training"
    flare.send(flare.FLModel(
        params=params,
        metrics={"got": checksum(received.params), "sent": checksum(params), "number": number},
        meta={"NUM_STEPS_CURRENT_ROUND": 1},
    ))
"""


@pytest.fixture
def cyclic_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cyclic"
    folder.mkdir()
    (folder / "client.py").write_text(CLIENT)
    return folder


def _recipe(folder: Path, **kw) -> CyclicRecipe:
    torch.manual_seed(0)
    args = {"name": "cyc", "min_clients": 2, "num_rounds": 3, "key_metric": None, **kw}
    model = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    return CyclicRecipe(model=model, train_script="client.py", base_dir=folder, **args)


def _expected(recipe: CyclicRecipe, order: list[list[int]]) -> dict[str, torch.Tensor]:
    """The framework-free sequence: each visit adds 0.1 × the site's number, in order."""
    w = {k: v.clone() for k, v in recipe.initial_params().items()}
    for cycle in order:
        for number in cycle:
            w = {k: v + 0.1 * number for k, v in w.items()}
    return w


def _visits(run) -> list[list[dict]]:
    lines = (run.result_dir / "metrics" / "sites.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    rounds: dict[int, list[dict]] = {}
    for r in records:
        rounds.setdefault(r["round"], []).append(r)
    return [rounds[k] for k in sorted(rounds)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_visits_every_site_in_turn_bit_for_bit(cyclic_dir, tmp_path) -> None:
    recipe = _recipe(cyclic_dir)
    run = recipe.run(local_sim(tmp_path, "sim", 3))
    assert run.ok, run.reason
    assert _equal(run.load_final(), _expected(recipe, [[1, 2, 3]] * 3))
    sent = None
    for cycle in _visits(run):
        assert [v["metrics"]["number"] for v in cycle] == [1, 2, 3]
        for visit in cycle:  # each site trains what the previous one sent: no aggregation
            if sent is not None:
                assert visit["metrics"]["got"] == sent
            sent = visit["metrics"]["sent"]


def test_a_failing_site_is_skipped_with_the_reason(cyclic_dir, tmp_path) -> None:
    recipe = _recipe(cyclic_dir, train_args="--fail site-2")
    run = recipe.run(local_sim(tmp_path, "sim", 3))
    assert run.ok, run.reason
    assert _equal(run.load_final(), _expected(recipe, [[1, 3]] * 3))
    assert [m["failed"] for m in run.metrics] == [["site-2"]] * 3
    assert [m["accepted"] for m in run.metrics] == [2] * 3
    log = (run.result_dir / "run.log").read_text()
    assert "round 1: site-2 skipped in the cycle" in log and "fails on purpose" in log


def test_too_few_sites_training_fails_the_job(cyclic_dir, tmp_path) -> None:
    run = _recipe(cyclic_dir, min_clients=3, train_args="--fail site-2").run(
        local_sim(tmp_path, "sim", 3)
    )
    assert run.status == "FAILED"
    assert "round 1: only 2 of the 3 required sites trained in the cycle" in run.reason


def test_a_random_order_is_seeded(cyclic_dir, tmp_path) -> None:
    recipe = _recipe(cyclic_dir, order="random", num_rounds=4)
    a = recipe.run(local_sim(tmp_path, "a", 4, seed=5))
    b = recipe.run(local_sim(tmp_path, "b", 4, seed=5))
    assert a.ok and b.ok
    orders = [[v["metrics"]["number"] for v in cycle] for cycle in _visits(a)]
    assert orders == [[v["metrics"]["number"] for v in cycle] for cycle in _visits(b)]
    assert all(sorted(o) == [1, 2, 3, 4] for o in orders) and orders != [[1, 2, 3, 4]] * 4
    assert _equal(a.load_final(), _expected(recipe, orders))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"order": "backwards"}, "order must be 'fixed' or 'random'"),
        ({"sample_clients": 2}, "cyclic does not take sample_clients"),
        ({"secure_aggregation": True}, "cyclic does not take secure_aggregation"),
        ({"federated_eval": True}, "cyclic does not take federated_eval"),
    ],
)
def test_what_a_cycle_cannot_do_is_refused(cyclic_dir, changes, match) -> None:
    with pytest.raises(RecipeError, match=match):
        _recipe(cyclic_dir, **changes)


def test_poc_gives_the_same_model(cyclic_dir, tmp_path) -> None:
    from conftest import free_port

    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    ws = tmp_path / "poc"
    poc.prepare(ws, sites=["site-1", "site-2", "site-3"], port=free_port())
    poc.start(ws)
    try:
        recipe = _recipe(cyclic_dir, train_args="--fail site-3", num_rounds=2)
        run = recipe.run(PocEnv(workspace=ws, display="none", results=tmp_path / "res"))
        assert run.ok, run.reason
        assert _equal(run.load_final(), _expected(recipe, [[1, 2]] * 2))
        assert [m["failed"] for m in run.metrics] == [["site-3"]] * 2
    finally:
        poc.stop(ws)
