"""Differential tests: fedctl's global model equals a framework-free FedAvg loop, bit for bit.

The workload (tests/ground_truth/workload) is written the way users write scripts: it sends
``model.state_dict()`` without a copy, may take its model from a module-level cache in a helper
module outside the job folder (one model per *process*, reused by every site that process runs),
and may change its tensors right after ``send()``. Whatever the backend, residency mode and
number of workers, what a site sent must be what is aggregated (issue 9).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ground_truth.reference import HELPERS, WORKLOAD, assert_bit_identical, fedavg

from fedctl.recipe import SimEnv, load_recipe

CACHE = f"--cache-dir {HELPERS}"
VARIANTS = {
    "cache": CACHE,
    "mutate": "--mutate",
    "cache-mutate": f"{CACHE} --mutate",
    "cache-diff": f"{CACHE} --diff",
    "mutate-diff": "--mutate --diff",
    "build-mutate": "--build-model --mutate",
}


def _simulate(tmp: Path, args: str, rounds: int, **env) -> dict[str, torch.Tensor]:
    recipe = load_recipe(WORKLOAD).recipe.with_overrides(num_rounds=rounds, train_args=args)
    run = recipe.run(SimEnv(workspace=tmp, display="none", **env))
    assert run.ok, run.reason
    return run.load_final()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "per-round"])
def test_local_backend_equals_the_reference(variant, resident, tmp_path) -> None:
    args = VARIANTS[variant]
    got = _simulate(tmp_path, args, 3, num_clients=4, backend="local", resident=resident)
    assert_bit_identical(got, fedavg(4, 3, diff="--diff" in args))


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "per-round"])
def test_local_backend_after_one_round(resident, tmp_path) -> None:
    got = _simulate(
        tmp_path, f"{CACHE} --mutate", 1, num_clients=4, backend="local", resident=resident
    )
    assert_bit_identical(got, fedavg(4, 1))


@pytest.mark.parametrize(
    ("variant", "rounds", "env"),
    [
        ("cache-mutate", 3, {"num_clients": 3, "workers": 3}),  # resident, a worker per site
        ("cache-mutate", 1, {"num_clients": 3, "workers": 3}),
        ("cache", 3, {"num_clients": 5, "workers": 2}),  # per-round: more sites than workers
        ("cache", 1, {"num_clients": 5, "workers": 2}),
        ("mutate", 3, {"num_clients": 5, "workers": 2}),
        ("cache-diff", 3, {"num_clients": 5, "workers": 2}),
        ("build-mutate", 3, {"num_clients": 5, "workers": 2}),
        ("cache-mutate", 3, {"num_clients": 4, "workers": 2, "resident": True}),
    ],
    ids=[
        "resident",
        "resident-1",
        "per-round",
        "per-round-1",
        "per-round-mutate",
        "per-round-diff",
        "per-round-build-model",
        "resident-shared-workers",
    ],
)
@pytest.mark.parametrize("backend", ["ray", "process"])
def test_pool_backends_equal_the_reference(
    ray_cluster, backend, variant, rounds, env, tmp_path
) -> None:
    args = VARIANTS[variant]
    got = _simulate(tmp_path, args, rounds, backend=backend, **env)
    assert_bit_identical(got, fedavg(env["num_clients"], rounds, diff="--diff" in args))


@pytest.mark.parametrize(
    "env",
    [{"backend": "local"}, {"workers": 2}, {"workers": 2, "backend": "process"}],
    ids=["local", "ray", "process"],
)
def test_same_seed_same_model_across_runs(ray_cluster, env, tmp_path) -> None:
    args = f"{CACHE} --mutate --global-rng"
    first = _simulate(tmp_path / "a", args, 2, num_clients=5, seed=3, **env)
    again = _simulate(tmp_path / "b", args, 2, num_clients=5, seed=3, **env)
    assert_bit_identical(again, first)
    other = _simulate(tmp_path / "c", args, 2, num_clients=5, seed=4, **env)
    assert any(not torch.equal(other[k], first[k]) for k in first)


@pytest.mark.parametrize("backend", ["local", "process"])
def test_a_model_built_without_its_initialisation_trains_the_same(backend, tmp_path) -> None:
    """build_model draws nothing from torch's global generator, but fedctl seeds it when a
    script receives its task: the seeded mini-batch order, and so the model, are unchanged."""
    args = "--mutate --global-rng"
    plain = _simulate(tmp_path / "a", args, 2, num_clients=3, seed=3, backend=backend)
    built = _simulate(
        tmp_path / "b", f"{args} --build-model", 2, num_clients=3, seed=3, backend=backend
    )
    assert_bit_identical(built, plain)
