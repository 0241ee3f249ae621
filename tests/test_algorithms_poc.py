"""Algorithms on the real runtime: a POC (server and two site agents as processes, mutual TLS)
gives bit for bit the model the simulator gives, for SCAFFOLD (control variates through the
wire and the site state), FedBN (local layers in the site state), the median, and a recipe
with sampling, federated, server-side and cross-site evaluation. Slow: ``make test-slow``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import free_port

from fedctl.recipe import PocEnv, SimEnv, load_recipe
from fedctl.runtime import poc

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def poc_two_sites(tmp_path_factory):
    ws = tmp_path_factory.mktemp("poc-alg") / "ws"
    poc.prepare(ws, sites=["site-1", "site-2"], port=free_port())
    poc.start(ws, site="site-1")
    poc.start(ws, site="site-2")
    yield ws
    poc.stop(ws)


@pytest.mark.parametrize(
    ("path", "changes"),
    [
        ("scaffold", {"num_rounds": 3}),
        ("personalization", {"num_rounds": 2}),
        ("robust/median.py", {"num_rounds": 2, "aggregator": "median", "min_clients": 2}),
        ("evaluation", {"num_rounds": 2}),
    ],
)
def test_poc_gives_the_simulators_model(poc_two_sites, tmp_path: Path, path, changes) -> None:
    recipe = load_recipe(RECIPES / path).recipe.with_overrides(**changes)
    run = recipe.run(PocEnv(workspace=poc_two_sites, display="none", results=tmp_path / "poc"))
    assert run.ok, run.reason
    sim = recipe.run(
        SimEnv(num_clients=2, backend="local", display="none", workspace=tmp_path / "sim")
    )
    assert sim.ok, sim.reason
    a, b = run.load_final(), sim.load_final()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run.final_metrics == sim.final_metrics
    if recipe.cross_site_eval:
        assert (run.result_dir / "cross_site_eval.json").is_file()
