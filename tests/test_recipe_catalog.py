"""Algorithm recipes: the catalog CLI, export/load of every kind, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedctl.cli.main import main
from fedctl.errors import RecipeError
from fedctl.recipe import (
    REGISTRY,
    CyclicRecipe,
    FedAdagradRecipe,
    FedAdamRecipe,
    FedAvgMRecipe,
    FedAvgRecipe,
    FedBNRecipe,
    FedNovaRecipe,
    FedProxRecipe,
    FedYogiRecipe,
    PartialSharingRecipe,
    ScaffoldRecipe,
    load_job,
)

KINDS = {
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "fednova",
    "scaffold",
    "fedbn",
    "fedper",
    "cyclic",
    "fedbuff",
    "fedasync",
    "swarm",
    "flower",
}


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)


def _args(tmp_path: Path, **kw) -> dict:
    (tmp_path / "client.py").write_text("")
    (tmp_path / "evaluate.py").write_text("def evaluate(params):\n    return {'x': 1.0}\n")
    return {
        "name": "t",
        "min_clients": 5,
        "num_rounds": 2,
        "model": BNNet(),
        "train_script": "client.py",
        "base_dir": tmp_path,
        **kw,
    }


def test_recipe_list_shows_every_kind(capsys) -> None:
    assert main(["recipe", "list", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)["result"]
    assert {e["kind"] for e in catalog} >= KINDS
    for entry in catalog:
        assert entry["summary"] and entry["paper"] and entry["parameters"], entry["kind"]
        assert all(p["doc"] for p in entry["parameters"]), entry["kind"]
    prox = next(e for e in catalog if e["kind"] == "fedprox")
    mu = next(p for p in prox["parameters"] if p["name"] == "mu")
    assert mu == {"name": "mu", "required": False, "default": 0.01, "doc": mu["doc"]}
    assert main(["recipe", "list"]) == 0
    out = capsys.readouterr().out
    assert all(kind in out for kind in KINDS)


def test_recipe_show(capsys) -> None:
    assert main(["recipe", "show", "scaffold"]) == 0
    out = capsys.readouterr().out
    assert "Karimireddy" in out and "server_lr" in out and "recipes/scaffold" in out
    assert "aggregator" in out and "sample_clients" in out
    assert main(["recipe", "show", "FedAdamRecipe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["kind"] == "fedadam"
    assert main(["recipe", "show", "lasso"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown recipe kind 'lasso' (kinds: fedavg,") and "\n" not in err
    assert main(["recipe", "show", "scafold"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown recipe kind 'scafold'; did you mean 'scaffold'? (kinds:")
    assert main(["recipe", "show", "FedProxRecipee"]) == 2
    assert "did you mean 'fedprox'?" in capsys.readouterr().err


def test_recipe_catalog_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom fedctl.cli.main import main\n"
        "main(['recipe', 'list', '--json'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().endswith("LIGHT")


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        (FedAvgRecipe, {"aggregator": {"name": "trimmed_mean", "beta": 0.2}}),
        (FedAvgMRecipe, {"server_lr": 0.5, "server_momentum": 0.8, "sample_clients": 0.5}),
        (FedAdamRecipe, {"eta": 0.02, "tau": 1e-2, "aggregator": "median"}),
        (FedYogiRecipe, {"beta2": 0.9}),
        (FedAdagradRecipe, {"eta": 0.3}),
        (FedProxRecipe, {"mu": 0.5, "federated_eval": True, "eval_every": 2}),
        (FedNovaRecipe, {"local_momentum": 0.9}),
        (ScaffoldRecipe, {"server_lr": 0.7, "aggregator": {"name": "krum", "f": 1}}),
        (FedBNRecipe, {"local": ["head.*"], "cross_site_eval": True}),
        (PartialSharingRecipe, {"shared": ["fc.*"], "server_eval": "evaluate.py:evaluate"}),
        (CyclicRecipe, {"order": "random"}),
    ],
)
def test_every_kind_exports_and_loads_back_equal(tmp_path: Path, cls, extra) -> None:
    recipe = cls(**_mk(tmp_path, **extra))
    assert recipe.kind in KINDS and REGISTRY[recipe.kind] is cls
    loaded = load_job(recipe.export(tmp_path / "job"))
    assert loaded == recipe and type(loaded) is cls
    for k, v in extra.items():
        assert getattr(loaded, k) == v
    workflow = loaded.build_workflow()
    assert workflow.num_rounds == 2


def _mk(tmp_path: Path, **extra) -> dict:
    folder = tmp_path / "r"
    folder.mkdir(exist_ok=True)
    return _args(folder, **extra)


def test_server_eval_is_loaded_from_the_recipe_folder(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(**_mk(tmp_path, server_eval="evaluate.py:evaluate"))
    fn = recipe.build_workflow().server_eval
    assert fn({"w": torch.zeros(1)}) == {"x": 1.0}


@pytest.mark.parametrize(
    ("cls", "extra", "message"),
    [
        (
            FedAvgRecipe,
            {"aggregator": {"name": "krum", "f": 2}},
            "aggregator krum with f=2 needs at least 7 results per round, but min_clients is 5",
        ),
        (FedAvgRecipe, {"aggregator": "average"}, "unknown aggregator 'average'"),
        (FedAvgRecipe, {"aggregator": {"name": "median", "f": object()}}, "not JSON data"),
        (FedAvgRecipe, {"sample_clients": 2}, "sample_clients=2 sites per round is below"),
        (FedAvgRecipe, {"sample_clients": 0.0}, "fraction must be in (0, 1]"),
        (FedAvgRecipe, {"federated_eval": "yes"}, "federated_eval must be true or false"),
        (FedAvgRecipe, {"eval_every": 0}, "eval_every must be an integer ≥ 1"),
        (FedAvgRecipe, {"server_eval": "evaluate.py"}, "must be 'file.py:function'"),
        (FedAvgRecipe, {"server_eval": "nope.py:f"}, "server_eval file 'nope.py' not found"),
        (FedAvgRecipe, {"server_eval": "../x.py:f"}, "must be inside"),
        (FedProxRecipe, {"mu": -0.1}, "mu must be a number (>= 0)"),
        (FedAvgMRecipe, {"server_momentum": 1.0}, "server_momentum must be a number"),
        (FedAdamRecipe, {"eta": 0}, "eta must be a number (> 0)"),
        (FedNovaRecipe, {"aggregator": "median"}, "fednova does its own normalised averaging"),
        (PartialSharingRecipe, {"local": ["nothing.*"]}, "the patterns match no parameter"),
        (PartialSharingRecipe, {"shared": []}, "keep every parameter local"),
        (PartialSharingRecipe, {}, "fedper needs shared or local patterns"),
        (PartialSharingRecipe, {"local": "head.*"}, "local must be a list of glob patterns"),
        (CyclicRecipe, {"order": "backwards"}, "order must be 'fixed' or 'random'"),
        (CyclicRecipe, {"aggregator": "median"}, "cyclic does not take aggregator"),
        (CyclicRecipe, {"central_dp": {"noise_multiplier": 1, "clip": 1}}, "take central_dp"),
    ],
)
def test_bad_algorithm_arguments_are_one_line_errors(tmp_path: Path, cls, extra, message) -> None:
    with pytest.raises(RecipeError) as err:
        cls(**_mk(tmp_path, **extra))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_fedbn_needs_batch_norm(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="the model has no batch-norm layers"):
        FedBNRecipe(**_mk(tmp_path, model=nn.Linear(2, 2)))


def test_server_eval_with_a_broken_file_is_one_line(tmp_path: Path) -> None:
    recipe = FedAvgRecipe(**_mk(tmp_path, server_eval="evaluate.py:evaluate"))
    (tmp_path / "r" / "evaluate.py").write_text("import nonexistent_module_x\n")
    with pytest.raises(RecipeError, match=r"server_eval: .*evaluate.py:1: ModuleNotFoundError"):
        recipe.build_workflow()
    (tmp_path / "r" / "evaluate.py").write_text("x = 1\n")
    with pytest.raises(RecipeError, match="defines no function 'evaluate'"):
        recipe.build_workflow()
