"""``flare.patch(trainer)``: PyTorch Lightning in one line (issue 17).

recipes/lightning's client (a LightningModule, a LightningDataModule, a patched Trainer) gives
bit for bit the global model of loop_client.py, the same training written by hand, under
FedAvg, FedProx and SCAFFOLD; and it answers evaluation and submit_model tasks. In process
(``backend="local"``), on CPU, with a tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedctl.recipe import FedAvgRecipe, FedProxRecipe, ScaffoldRecipe, SimEnv, load_recipe

pytest.importorskip("lightning")

REPO = Path(__file__).resolve().parent.parent
LIGHTNING = REPO / "recipes" / "lightning"


@pytest.fixture(scope="module")
def base():
    return load_recipe(LIGHTNING).recipe


def _as(cls, base, **changes):
    spec = {**base.to_spec(), "num_rounds": 2, **changes}
    return cls(**spec, model=base.model, base_dir=base.base_dir)


def _final(recipe, tmp_path: Path, **env):
    run = recipe.run(
        SimEnv(
            **{
                "num_clients": 2,
                "backend": "local",
                "display": "none",
                "workspace": tmp_path,
                **env,
            }
        )
    )
    assert run.ok, run.reason
    return run


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fedavg_run(base, tmp_path_factory):
    return _final(_as(FedAvgRecipe, base), tmp_path_factory.mktemp("l-fedavg"))


@pytest.fixture(scope="module")
def fedavg_model(fedavg_run):
    return fedavg_run.load_final()


def test_the_lightning_recipe_equals_the_hand_written_loop(base, fedavg_model, tmp_path) -> None:
    loop = _final(_as(FedAvgRecipe, base, train_script="loop_client.py"), tmp_path)
    assert _equal(fedavg_model, loop.load_final())


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(FedProxRecipe, {"mu": 0.5}), (ScaffoldRecipe, {})],
    ids=["fedprox", "scaffold"],
)
def test_fedprox_and_scaffold_through_the_patch(base, fedavg_model, tmp_path, cls, extra) -> None:
    patched = _final(_as(cls, base, **extra), tmp_path / "a").load_final()
    loop = _final(_as(cls, base, train_script="loop_client.py", **extra), tmp_path / "b")
    assert _equal(patched, loop.load_final())
    assert not _equal(patched, fedavg_model)  # the algorithm did act


def test_resident_scripts_give_the_same_model(base, fedavg_run, tmp_path) -> None:
    """One trainer per site kept across rounds (resident) = a new one every round."""
    resident = _final(_as(FedAvgRecipe, base), tmp_path, resident=True)
    per_round = fedavg_run
    assert _equal(resident.load_final(), per_round.load_final())
    # self.log streams to the server; its steps keep growing across rounds in both modes
    for run_dir in (resident.result_dir, per_round.result_dir):
        lines = (run_dir / "metrics" / "tracking.jsonl").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        for site in ("site-1", "site-2"):
            steps = [r["step"] for r in recs if r["site"] == site and r["tag"] == "val_loss"]
            assert len(steps) == 4 and steps == sorted(steps) and steps[0] == 0, steps


def test_evaluation_and_submit_model_tasks(base, tmp_path) -> None:
    recipe = _as(FedAvgRecipe, base, federated_eval=True, cross_site_eval=True)
    run = _final(recipe, tmp_path)
    assert {"val_accuracy", "eval_val_accuracy", "eval_val_loss"} <= set(run.final_metrics)
    matrix = json.loads((run.result_dir / "cross_site_eval.json").read_text())
    assert matrix["models"] == ["global", "site-1", "site-2"]
    assert all(set(matrix["results"][m]) == {"site-1", "site-2"} for m in matrix["models"])
    assert matrix["errors"] == {"submit_model": {}, "evaluate": {}}
    assert "NUM_SAMPLES" not in (run.result_dir / "run.log").read_text()  # weighted by samples


def test_patch_needs_lightning_and_a_trainer() -> None:
    code = """
import sys
sys.modules["lightning"] = sys.modules["lightning.pytorch"] = None
import fedctl.client as flare
class Trainer:
    pass
Trainer.__module__ = "lightning.pytorch.trainer.trainer"
for trainer in (Trainer(), object()):
    try:
        flare.patch(trainer)
    except flare.api.ClientAPIError as exc:
        print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "flare.patch() needs PyTorch Lightning: pip install 'fedctl[lightning]'",
        "flare.patch() takes a Lightning Trainer, got builtins.object",
    ]


def test_patch_wants_a_length_per_round() -> None:
    import lightning.pytorch as L

    from fedctl.client.channel import install
    from fedctl.client.lightning import patch
    from fedctl.errors import ClientAPIError

    trainer = L.Trainer(max_epochs=-1, logger=False, enable_progress_bar=False)
    try:
        with pytest.raises(ClientAPIError, match="max_epochs"):
            patch(trainer)
    finally:
        install(None)
