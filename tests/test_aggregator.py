"""The incremental weighted mean: golden values, FULL/DIFF, partial updates, rejections."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedctl.aggregators import MetricsMean, UpdateRejected, WeightedAggregator
from fedctl.codec.model import ParamsType


def test_weighted_mean_matches_hand_computation() -> None:
    g = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}
    agg = WeightedAggregator(g)
    agg.add({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}, 1)
    agg.add({"w": torch.tensor([4.0, -2.0]), "b": torch.tensor([0.0])}, 3)
    out = agg.result()
    # w = (1*[1,2] + 3*[4,-2]) / 4 = [13/4, -4/4];  b = (3 + 0) / 4
    assert torch.allclose(out["w"], torch.tensor([3.25, -1.0]))
    assert torch.allclose(out["b"], torch.tensor([0.75]))
    assert out["w"].dtype == torch.float32


def test_diff_and_full_give_the_same_model() -> None:
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(50, generator=gen), "v": torch.randn(3, 3, generator=gen)}
    locals_ = [{k: v + torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in range(5)]
    weights = [3, 1, 7, 2, 5]
    full, diff, mixed = (WeightedAggregator(g) for _ in range(3))
    for i, (p, w) in enumerate(zip(locals_, weights, strict=True)):
        d = {k: p[k] - g[k] for k in p}
        full.add(p, w, ParamsType.FULL)
        diff.add(d, w, ParamsType.DIFF)
        mixed.add(p if i % 2 else d, w, ParamsType.FULL if i % 2 else ParamsType.DIFF)
    a, b, c = full.result(), diff.result(), mixed.result()
    expected = {
        k: sum(w * p[k].double() for p, w in zip(locals_, weights, strict=True)) / sum(weights)
        for k in g
    }
    for k in g:
        assert torch.allclose(a[k], expected[k].float(), atol=1e-6)
        assert torch.allclose(b[k], a[k], atol=1e-6)
        assert torch.allclose(c[k], a[k], atol=1e-6)


def test_order_of_arrival_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    g = {"w": torch.from_numpy(rng.standard_normal(10_000).astype(np.float32))}
    ups = [
        ({"w": torch.from_numpy(rng.standard_normal(10_000).astype(np.float32))}, float(w))
        for w in (1, 5, 2, 9)
    ]
    results = []
    for perm in itertools.permutations(ups):
        agg = WeightedAggregator(g)
        for p, w in perm:
            agg.add(p, w)
        results.append(agg.result()["w"])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_partial_updates_and_untouched_parameters() -> None:
    g = {"shared": torch.zeros(2), "head": torch.full((2,), 5.0), "bn": torch.ones(1)}
    agg = WeightedAggregator(g)
    agg.add({"shared": torch.tensor([2.0, 2.0]), "head": torch.tensor([1.0, 1.0])}, 1)
    agg.add({"shared": torch.tensor([4.0, 4.0])}, 1)
    out = agg.result()
    assert torch.equal(out["shared"], torch.tensor([3.0, 3.0]))
    assert torch.equal(out["head"], torch.tensor([1.0, 1.0]))  # only one site sent it
    assert out["bn"] is g["bn"]  # nobody sent it: the global value stays


def test_integer_buffers_are_averaged_and_rounded() -> None:
    g = {"num_batches_tracked": torch.tensor(10)}
    agg = WeightedAggregator(g)
    agg.add({"num_batches_tracked": torch.tensor(15)}, 1)
    agg.add({"num_batches_tracked": torch.tensor(20)}, 2)
    out = agg.result()["num_batches_tracked"]
    assert out.dtype == torch.int64 and int(out) == 18  # (15 + 40) / 3 = 18.33


def test_zero_weight_counts_but_does_not_move_the_model() -> None:
    g = {"w": torch.zeros(1)}
    agg = WeightedAggregator(g)
    agg.add({"w": torch.ones(1)}, 0)
    agg.add({"w": torch.full((1,), 4.0)}, 2)
    assert agg.count == 2
    assert torch.equal(agg.result()["w"], torch.full((1,), 4.0))


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        ({"nope": torch.ones(2)}, 1, "unknown parameter 'nope'"),
        ({"w": torch.ones(3)}, 1, r"shape \(3,\), expected \(2,\)"),
        ({"w": torch.tensor([1.0, float("nan")])}, 1, "NaN or infinite"),
        ({"w": torch.tensor([1.0, float("inf")])}, 1, "NaN or infinite"),
        ({"w": torch.ones(2)}, -1, "must be ≥ 0"),
        ({"w": torch.ones(2)}, float("nan"), "finite number"),
        ({"w": torch.ones(2)}, "3", "finite number"),
    ],
)
def test_bad_updates_are_rejected_whole(update, weight, message) -> None:
    g = {"w": torch.zeros(2), "v": torch.zeros(1)}
    agg = WeightedAggregator(g)
    agg.add({"w": torch.full((2,), 2.0), "v": torch.ones(1)}, 1)
    with pytest.raises(UpdateRejected, match=message):
        agg.add({"v": torch.full((1,), 100.0), **update}, weight)
    out = agg.result()  # the rejected update left no trace
    assert torch.equal(out["w"], torch.full((2,), 2.0)) and torch.equal(out["v"], torch.ones(1))


def test_float32_precision_option() -> None:
    g = {"w": torch.zeros(3)}
    agg = WeightedAggregator(g, precision="float32")
    agg.add({"w": torch.ones(3)}, 2)
    assert agg._acc["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        WeightedAggregator(g, precision="float16")


def test_metrics_mean_is_weighted_per_key() -> None:
    m = MetricsMean()
    m.add({"acc": 0.5, "loss": 2.0}, 1)
    m.add({"acc": 1.0}, 3)
    m.add({"acc": 0.0}, 0)
    assert m.result() == {"acc": pytest.approx(0.875), "loss": 2.0}


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_inputs_are_never_modified(precision) -> None:
    g = {"w": torch.zeros(3), "n": torch.tensor(4)}
    first = {"w": torch.ones(3), "n": torch.tensor(6)}
    second = {"w": torch.full((3,), 3.0), "n": torch.tensor(2)}
    before = {k: v.clone() for k, v in {**first, **{f"s{k}": v for k, v in second.items()}}.items()}
    agg = WeightedAggregator(g, precision=precision)
    agg.add(first, 5)
    agg.add(second, 1, ParamsType.DIFF)
    agg.result()
    assert torch.equal(first["w"], before["w"]) and torch.equal(first["n"], before["n"])
    assert torch.equal(second["w"], before["sw"]) and torch.equal(g["w"], torch.zeros(3))


@pytest.mark.parametrize(
    "dtype, precision",
    [
        (torch.float32, "float64"),
        (torch.float16, "float64"),
        (torch.bfloat16, "float64"),
        (torch.float16, "float32"),
        (torch.bfloat16, "float32"),
    ],
)
@pytest.mark.parametrize("params_type", [ParamsType.FULL, ParamsType.DIFF])
def test_large_updates_of_another_dtype_sum_bit_for_bit_as_plain_add(
    dtype, precision, params_type
) -> None:
    """Updates larger than one slice whose dtype is not the accumulator's are converted slice by
    slice into a reused buffer (PyTorch's mixed-dtype add_ is slow on large tensors). The sum
    must equal, bit for bit, what one mixed-dtype add_ per tensor gives, across slice edges."""
    from fedctl.aggregators import weighted

    gen = torch.Generator().manual_seed(3)
    n = 2 * weighted._MIX_SLICE + 17  # two whole slices and a short one

    def tensor(size: tuple[int, ...] = (n,)) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(dtype)

    global_params = {"w": tensor(), "small": tensor((100,))}
    updates = [
        ({k: tensor(tuple(v.shape)) for k, v in global_params.items()}, w) for w in (0.3, 1.7, 2.9)
    ]
    agg = WeightedAggregator(global_params, precision)
    for update, weight in updates:
        agg.add(update, weight, params_type)
    got = agg.result()

    acc_dtype = torch.float64 if precision == "float64" else torch.float32
    for name, g in global_params.items():  # the same arithmetic, one mixed-dtype add_ each
        acc = updates[0][0][name].to(acc_dtype).mul_(updates[0][1])
        for update, weight in updates[1:]:
            acc.add_(update[name], alpha=weight)
        total = sum(w for _, w in updates)
        acc.div_(total)
        if params_type == ParamsType.DIFF:
            acc.add_(g, alpha=total / total)
        assert torch.equal(got[name], acc.to(g.dtype)), name
    assert list(agg._scratch) == [acc_dtype]  # the large tensor went through the buffer
    assert agg._scratch[acc_dtype].numel() == weighted._MIX_SLICE
