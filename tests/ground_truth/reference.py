"""The framework-free ground truth: the workload's FedAvg as a plain sequential PyTorch loop.

Same model, data, mini-batches and FedAvg (weighted by local steps, summed in float64, cast
back) as fedctl runs, with no fedctl code at all, so a simulator or runtime bug cannot hide in
both sides of a comparison.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

WORKLOAD = Path(__file__).resolve().parent / "workload"
HELPERS = Path(__file__).resolve().parent / "helpers"


def _load(name: str) -> ModuleType:
    """A workload module under a private name (never ``model``/``train`` in sys.modules)."""
    spec = importlib.util.spec_from_file_location(f"_ground_truth_{name}", WORKLOAD / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fedavg(num_sites: int, rounds: int, *, diff: bool = False) -> dict[str, torch.Tensor]:
    """The global model after ``rounds`` rounds of FedAvg over ``num_sites`` sites."""
    model_mod, train = _load("model"), _load("train")
    global_params = {k: v.clone() for k, v in model_mod.initial_model().state_dict().items()}
    model = model_mod.Net()
    for rnd in range(rounds):
        acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_params.items()}
        total = 0
        for i in range(num_sites):
            x, y = train.shard(i)
            model.load_state_dict(global_params)
            steps = train.local_train(model, x, y, i, rnd)
            for k, v in model.state_dict().items():
                update = v - global_params[k] if diff else v
                acc[k] += update.double() * steps
            total += steps
        global_params = {
            k: ((acc[k] / total + g.double()) if diff else acc[k] / total).to(g.dtype)
            for k, g in global_params.items()
        }
    return global_params


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest elementwise difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor equal, bit for bit (the message gives the largest difference)."""
    same = got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want
    )
    assert same, f"differs from the ground truth by up to {max_abs_diff(got, want):.3e}"
