"""Robust aggregators: golden vectors against NumPy, Krum against a poisoned update, specs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedctl.aggregators import (
    TooFewResults,
    UpdateRejected,
    make_aggregator,
    min_results,
    parse_aggregator,
)
from fedctl.aggregators.bulyan import bulyan_select
from fedctl.aggregators.krum import krum_scores
from fedctl.codec.model import ParamsType

RNG = np.random.default_rng(7)
# seven updates of a two-parameter model: "w" (2 × 3) and "b" (2,)
UPDATES = [{"w": RNG.normal(size=(2, 3)), "b": RNG.normal(size=2)} for _ in range(7)]
GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


def _run(spec, updates=UPDATES, global_params=GLOBAL):
    agg = make_aggregator(spec, global_params)
    for u in updates:
        agg.add({k: torch.tensor(v, dtype=torch.float32) for k, v in u.items()}, 1.0)
    return agg.result()


def _stack(key: str, updates=UPDATES) -> np.ndarray:
    return np.stack([u[key].astype(np.float32).astype(np.float64) for u in updates])


def _np_dist(updates=UPDATES) -> np.ndarray:
    flat = np.stack(
        [np.concatenate([u[k].astype(np.float32).ravel() for k in ("w", "b")]) for u in updates]
    ).astype(np.float64)
    return ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)


def _np_krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    n = len(dist)
    k = n - f - 2
    return np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])


@pytest.mark.parametrize("n", [7, 6])  # odd and even counts
def test_median_matches_numpy(n: int) -> None:
    out = _run("median", UPDATES[:n])
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k].numpy(), np.median(_stack(k, UPDATES[:n]), 0), 1e-6)
        assert out[k].dtype == torch.float32 and out[k].shape == GLOBAL[k].shape


def test_median_by_hand() -> None:
    g = {"x": torch.zeros(3)}
    out = _run(
        "median",
        [{"x": np.array(v, dtype=float)} for v in ([1, 5, -3], [2, 100, 0], [9, 4, 1])],
        g,
    )
    assert out["x"].tolist() == [2.0, 5.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "k"),
    [
        ({"name": "trimmed_mean", "beta": 0.2}, 1),
        ({"name": "trimmed_mean", "beta": 0.3}, 2),
        ({"name": "trimmed_mean", "f": 2}, 2),
    ],
)
def test_trimmed_mean_matches_numpy(spec, k: int) -> None:
    out = _run(spec)
    for key in ("w", "b"):
        s = np.sort(_stack(key), 0)
        np.testing.assert_allclose(out[key].numpy(), s[k : len(s) - k].mean(0), rtol=1e-6)


def test_krum_picks_the_lowest_score_and_multi_krum_averages() -> None:
    dist = _np_dist()
    for f in (0, 1, 2):
        scores = _np_krum_scores(dist, f)
        np.testing.assert_allclose(krum_scores(torch.tensor(dist), f).numpy(), scores)
        best = int(np.argmin(scores))
        out = _run({"name": "krum", "f": f})
        for key in ("w", "b"):
            np.testing.assert_allclose(out[key].numpy(), _stack(key)[best], rtol=1e-6)
    f, m = 1, 3
    chosen = np.argsort(_np_krum_scores(dist, f), kind="stable")[:m]
    out = _run({"name": "multi_krum", "f": f, "m": m})
    for key in ("w", "b"):
        np.testing.assert_allclose(out[key].numpy(), _stack(key)[chosen].mean(0), rtol=1e-6)


def test_bulyan_matches_a_numpy_reference() -> None:
    f = 1
    n = len(UPDATES)
    # Bulyan's repeated Krum meets ties (two updates that are each other's nearest neighbour);
    # the aggregator breaks them by a canonical order of the updates, so the reference uses it.
    probe = make_aggregator({"name": "bulyan", "f": f}, GLOBAL)
    for u in UPDATES:
        probe.add({k: torch.tensor(v, dtype=torch.float32) for k, v in u.items()}, 1.0)
    updates = [UPDATES[i] for i in probe.canonical_order()]
    dist = _np_dist(updates)
    remaining, chosen = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = dist[np.ix_(remaining, remaining)]
        k = max(1, min(len(remaining) - f - 2, len(remaining) - 1))
        scores = [np.sort(np.delete(sub[i], i))[:k].sum() for i in range(len(remaining))]
        pick = remaining[int(np.argmin(scores))]
        chosen.append(pick)
        remaining.remove(pick)
    assert sorted(chosen) == bulyan_select(torch.tensor(dist), f)
    beta = len(chosen) - 2 * f
    out = _run({"name": "bulyan", "f": f})
    for key in ("w", "b"):
        s = _stack(key, updates)[sorted(chosen)]
        med = np.median(s, 0)
        idx = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
        expected = np.take_along_axis(s, idx, 0).mean(0)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6)


def test_krum_rejects_an_obviously_poisoned_update() -> None:
    rng = np.random.default_rng(0)
    honest = [
        {"w": 1.0 + 0.01 * rng.normal(size=(2, 3)), "b": 0.01 * rng.normal(size=2)}
        for _ in range(6)
    ]
    poisoned = {"w": np.full((2, 3), -1000.0), "b": np.full(2, 1000.0)}
    updates = [*honest[:3], poisoned, *honest[3:]]
    agg = make_aggregator({"name": "krum", "f": 1}, GLOBAL)
    for u in updates:
        agg.add({k: torch.tensor(v, dtype=torch.float32) for k, v in u.items()}, 1.0)
    assert 3 not in agg.selected()
    out = agg.result()
    assert torch.allclose(out["w"], torch.ones(2, 3), atol=0.05)
    mean = _run(None, updates)
    assert mean["w"].abs().max() > 100  # the plain mean is ruined by the same update
    for spec in (
        "median",
        {"name": "trimmed_mean", "f": 1},
        {"name": "bulyan", "f": 1},
        {"name": "multi_krum", "f": 1},
    ):
        assert torch.allclose(_run(spec, updates)["w"], torch.ones(2, 3), atol=0.05), spec


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ({"name": "krum", "f": 2}, 5, "aggregator krum with f=2 needs at least 7 results, got 5"),
        (
            {"name": "bulyan", "f": 1},
            6,
            "aggregator bulyan with f=1 needs at least 7 results, got 6",
        ),
        ({"name": "multi_krum", "f": 1, "m": 5}, 5, "needs at least 6 results, got 5"),
        (
            {"name": "median", "f": 2},
            4,
            "aggregator median with f=2 needs at least 5 results, got 4",
        ),
        ({"name": "trimmed_mean", "beta": 0.1}, 7, "needs at least 10 results, got 7"),
    ],
)
def test_too_few_results_is_one_line_with_the_numbers(spec, n: int, message: str) -> None:
    with pytest.raises(TooFewResults) as err:
        _run(spec, UPDATES[:n])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_min_results_and_spec_errors() -> None:
    assert min_results(None) == min_results("mean") == 1
    assert min_results({"name": "krum", "f": 1}) == 5
    assert min_results({"name": "bulyan", "f": 2}) == 11
    assert min_results({"name": "trimmed_mean", "beta": 0.25}) == 4
    assert parse_aggregator("median") == ("median", {})
    for bad, message in [
        ("avg", "unknown aggregator 'avg'"),
        ({"f": 1}, "needs a 'name'"),
        ({"name": "krum"}, "krum needs f"),
        ({"name": "krum", "f": -1}, "krum f must be an integer ≥ 0"),
        ({"name": "trimmed_mean", "beta": 0.5}, "beta must be a number in [0, 0.5)"),
        ({"name": "trimmed_mean"}, "exactly one of beta"),
        ({"name": "median", "g": 1}, "takes no parameter 'g'"),
        (3, "aggregator must be a name"),
    ]:
        with pytest.raises(ValueError, match=None) as err:
            parse_aggregator(bad)
        assert message in str(err.value), (bad, str(err.value))


def test_diff_updates_and_integer_entries() -> None:
    g = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(10)}
    agg = make_aggregator("median", g)
    agg.add({"w": torch.tensor([1.0, -1.0]), "n": torch.tensor(2)}, 1, ParamsType.DIFF)
    agg.add({"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(11)}, 1, ParamsType.FULL)
    agg.add({"w": torch.tensor([0.5, 0.5]), "n": torch.tensor(3)}, 1, ParamsType.DIFF)
    out = agg.result()
    # as full weights: [2, 0], [3, 0], [1.5, 1.5] → median [2, 0]; n: 12, 11, 13 → 12
    assert (
        out["w"].tolist() == [2.0, 0.0] and out["n"].item() == 12 and out["n"].dtype == torch.int64
    )


def test_partial_updates_are_per_parameter_for_coordinate_methods() -> None:
    agg = make_aggregator("median", GLOBAL)
    agg.add({"w": torch.ones(2, 3)}, 1)
    agg.add({"w": 3 * torch.ones(2, 3), "b": torch.ones(2)}, 1)
    agg.add({"w": 2 * torch.ones(2, 3)}, 1)
    out = agg.result()
    assert torch.equal(out["w"], 2 * torch.ones(2, 3)) and torch.equal(out["b"], torch.ones(2))


def test_vector_methods_need_the_same_parameters_and_reject_bad_updates() -> None:
    agg = make_aggregator({"name": "krum", "f": 0}, GLOBAL)
    agg.add({"w": torch.ones(2, 3), "b": torch.ones(2)}, 1)
    with pytest.raises(UpdateRejected, match="same parameters"):
        agg.add({"w": torch.ones(2, 3)}, 1)
    with pytest.raises(UpdateRejected, match="NaN"):
        agg.add({"w": torch.full((2, 3), float("nan")), "b": torch.ones(2)}, 1)
    assert agg.count == 1


def test_robust_results_do_not_depend_on_arrival_order() -> None:
    specs = [
        "median",
        {"name": "trimmed_mean", "beta": 0.2},
        {"name": "krum", "f": 1},
        {"name": "bulyan", "f": 1},
    ]
    for spec in specs:
        ref = _run(spec)
        for perm in itertools.islice(itertools.permutations(UPDATES), 0, 50, 7):
            out = _run(spec, list(perm))
            assert all(torch.equal(out[k], ref[k]) for k in ref), spec


def test_buffered_memory_grows_with_results_and_the_mean_does_not() -> None:
    g = {"w": torch.zeros(1000)}
    robust, mean = make_aggregator("median", g), make_aggregator(None, g)
    for _ in range(10):
        robust.add({"w": torch.ones(1000)}, 1)
        mean.add({"w": torch.ones(1000)}, 1)
    assert robust.nbytes == 10 * 1000 * 8 and not robust.incremental
    assert not hasattr(mean, "nbytes")
