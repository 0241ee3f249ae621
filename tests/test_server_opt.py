"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad): golden vectors against NumPy
implementations of the paper's formulas, and what they leave alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedctl.aggregators import ServerOptimizer

RNG = np.random.default_rng(3)
X0 = RNG.normal(size=5)
# three rounds of aggregates (what the sites' average would be each round)
AGGS = [X0 + RNG.normal(scale=0.1, size=5) for _ in range(3)]


def _numpy_reference(kind: str, lr: float, b1: float, b2: float, tau: float, mom: float):
    x = X0.copy()
    m = np.zeros_like(x)
    v = np.zeros_like(x) if kind == "sgdm" else np.full_like(x, tau**2)
    out = []
    for r in range(3):
        a = AGGS[r] + (x - X0)  # each round the sites move by the same offset from x
        d = a - x
        if kind == "sgdm":
            v = mom * v + d
            x = x + lr * v
        else:
            m = b1 * m + (1 - b1) * d
            if kind == "adam":
                v = b2 * v + (1 - b2) * d**2
            elif kind == "yogi":
                v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            else:
                v = v + d**2
            x = x + lr * m / (np.sqrt(v) + tau)
        out.append(x.copy())
    return out


@pytest.mark.parametrize(
    ("kind", "lr", "kw"),
    [
        ("sgdm", 0.7, {"momentum": 0.9}),
        ("adam", 0.05, {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        ("yogi", 0.05, {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
        ("adagrad", 0.1, {"beta1": 0.0, "tau": 1e-2}),
    ],
)
def test_matches_the_paper_formulas(kind: str, lr: float, kw: dict) -> None:
    opt = ServerOptimizer(kind, lr, **kw)
    expected = _numpy_reference(
        kind,
        lr,
        kw.get("beta1", 0.9),
        kw.get("beta2", 0.99),
        kw.get("tau", 1e-3),
        kw.get("momentum", 0.0),
    )
    x = {"w": torch.tensor(X0, dtype=torch.float64)}
    for r in range(3):
        agg = {"w": torch.tensor(AGGS[r] + (x["w"].numpy() - X0))}
        x = opt.step(x, agg)
        np.testing.assert_allclose(x["w"].numpy(), expected[r], rtol=1e-12, atol=1e-12)
    assert opt.steps == 3


def test_first_adam_step_by_hand() -> None:
    # Δ = 0.5: m = 0.05, v = 0.99·τ² + 0.01·0.25, x = 1 + 0.1·m / (√v + τ)
    tau = 1e-3
    opt = ServerOptimizer("adam", 0.1, beta1=0.9, beta2=0.99, tau=tau)
    out = opt.step(
        {"w": torch.tensor([1.0], dtype=torch.float64)},
        {"w": torch.tensor([1.5], dtype=torch.float64)},
    )
    v = 0.99 * tau**2 + 0.01 * 0.25
    assert out["w"].item() == pytest.approx(1 + 0.1 * 0.05 / (v**0.5 + tau), rel=1e-12)


def test_sgd_without_momentum_is_fedavg_and_statistics_pass_through() -> None:
    g = {
        "w": torch.tensor([1.0, 2.0]),
        "bn.running_var": torch.tensor([1.0]),
        "bn.num_batches_tracked": torch.tensor(5),
    }
    a = {
        "w": torch.tensor([2.0, 0.0]),
        "bn.running_var": torch.tensor([0.001]),
        "bn.num_batches_tracked": torch.tensor(9),
    }
    assert all(torch.equal(v, a[k]) for k, v in ServerOptimizer("sgdm", 1.0).step(g, a).items())
    out = ServerOptimizer("adam", 1.0).step(g, a)
    assert torch.equal(out["bn.running_var"], a["bn.running_var"])  # never pushed below 0
    assert torch.equal(out["bn.num_batches_tracked"], torch.tensor(9))
    assert out["w"].dtype == torch.float32


def test_inputs_are_never_modified_and_state_round_trips() -> None:
    g = {"w": torch.tensor([1.0, 2.0])}
    a = {"w": torch.tensor([2.0, 0.0])}
    g["w"].requires_grad_(False)
    snapshot = {k: v.clone() for k, v in {**g, "a": a["w"]}.items()}
    opt = ServerOptimizer("yogi", 0.1)
    first = opt.step(g, a)
    assert torch.equal(g["w"], snapshot["w"]) and torch.equal(a["w"], snapshot["a"])
    clone = ServerOptimizer("yogi", 0.1)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(clone.step(first, a)["w"], opt.step(first, a)["w"])


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="server optimizer must be one of"):
        ServerOptimizer("lamb")
