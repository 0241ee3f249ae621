"""Incremental weighted mean of model updates (the FedAvg aggregate).

Each result is folded into a running weighted sum as it arrives and then dropped, so memory is
one accumulator per parameter whatever the number of clients (never N × model).

Both kinds of update share one accumulator: with FULL weights ``x`` and DIFF updates ``d``
(relative to the global model ``g`` the round started from),

    new = (Σ_full w·x + Σ_diff w·(g + d)) / Σ w = (acc + W_diff·g) / W
    with acc = Σ_full w·x + Σ_diff w·d

Weights are per parameter, so a site may send a subset of the parameters (personalisation);
a parameter nobody sent keeps its global value. Accumulation runs in float64 by default, which
makes the aggregate independent of the order results arrive in (to float32 rounding);
``precision="float32"`` halves the accumulator's memory for very large models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import ParamsType
from fedctl.constants import MAX_WEIGHT
from fedctl.errors import FedctlError, RunFailed

if TYPE_CHECKING:
    import torch


class UpdateRejected(FedctlError):
    """A site's update cannot be aggregated (unknown key, wrong shape or type, NaN, out of
    range, a bad weight): that site's result is refused, the round goes on."""


class AggregateUnusable(RunFailed):
    """The round's aggregate cannot be trusted (an update failed half-way into it)."""


PRECISIONS = ("float64", "float32")


def check_weight(weight: Any, what: str = "aggregation weight") -> float:
    """``weight`` as a float if it is finite and within [0, MAX_WEIGHT], else UpdateRejected.

    Bounded so that no honest-looking weight can overflow a running sum (1.7e308 would)."""
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise UpdateRejected(f"{what} must be a finite number, got {weight!r}")
    if weight < 0:
        raise UpdateRejected(f"{what} must be ≥ 0, got {weight}")
    if not math.isfinite(weight) or weight > MAX_WEIGHT:
        raise UpdateRejected(f"{what} must be a finite number ≤ {MAX_WEIGHT:.0e}, got {weight}")
    return float(weight)


def check_update(
    global_params: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    weight: float,
    params_type: ParamsType | None = ParamsType.FULL,
) -> None:
    """Raise UpdateRejected unless ``params`` can be aggregated into ``global_params``.

    Checks the weight, each name, shape and kind of dtype, that values are finite, and that
    each contribution (the weights, or the global value plus the difference for DIFF) fits the
    global parameter's dtype, so that no update can turn the aggregate into inf.
    """
    check_weight(weight)
    diff = params_type == ParamsType.DIFF
    batch: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    batch_bytes = 0
    for name, t in params.items():
        g = global_params.get(name)
        if g is None:
            raise UpdateRejected(f"unknown parameter {name!r} (not in the global model)")
        if t.shape != g.shape:
            raise UpdateRejected(
                f"parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(g.shape)}"
            )
        if t.is_floating_point() != g.is_floating_point() or (
            not g.is_floating_point() and t.dtype != g.dtype
        ):
            raise UpdateRejected(f"parameter {name!r} is {t.dtype}, expected {g.dtype}")
        if t.is_floating_point() and t.numel():
            batch.append((name, t, g))
            batch_bytes += t.numel() * t.element_size()
            if batch_bytes >= _CHECK_BATCH_BYTES:  # bounded memory when params load lazily
                _check_values(batch, diff)
                batch, batch_bytes = [], 0
    _check_values(batch, diff)


#: finiteness is checked in fused passes over at most this many bytes of tensors
_CHECK_BATCH_BYTES = 64 * 1024 * 1024


def _check_values(batch: list[tuple[str, torch.Tensor, torch.Tensor]], diff: bool) -> None:
    """Finite, and within the global dtype's range (one fused norm pass in the common case)."""
    import torch

    if not batch:
        return
    norms = torch._foreach_norm([t for _, t, _ in batch])
    g_norms = torch._foreach_norm([g for _, _, g in batch]) if diff else None
    for i, (name, t, g) in enumerate(batch):
        limit = torch.finfo(g.dtype).max
        bound = float(norms[i]) + (float(g_norms[i]) if g_norms is not None else 0.0)
        if math.isfinite(bound) and bound <= limit:
            continue  # |each value| ≤ its L2 norm: nothing can be out of range
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"parameter {name!r} contains NaN or infinite values")
        value = t.double() + g.double() if diff else t.double()
        if float(value.abs().max()) > limit:
            raise UpdateRejected(f"parameter {name!r} has values beyond the range of {g.dtype}")


def check_finite(params: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise AggregateUnusable naming the first parameter of ``params`` that is not finite
    (what becomes the global model is checked before it does)."""
    import torch

    floats = [(k, t) for k, t in params.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return
    norms = torch._foreach_norm([t for _, t in floats])
    for (name, t), n in zip(floats, norms, strict=True):
        if not math.isfinite(float(n)) and not bool(torch.isfinite(t).all()):
            raise AggregateUnusable(f"{what} has NaN or infinite values in {name!r}")


def _abs_max(t: torch.Tensor) -> float:
    """max |t| in one read pass, without a temporary the size of ``t`` (NaN if t has NaN)."""
    import torch

    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)
    return float(torch.maximum(lo.neg(), hi))


#: elements of an update converted at a time when its dtype differs from its accumulator's
_MIX_SLICE = 1 << 20


class WeightedAggregator:
    """Running weighted mean over results of one round; see the module docstring."""

    def __init__(
        self, global_params: Mapping[str, torch.Tensor], precision: str = "float64"
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.global_params = global_params
        self.precision = precision
        self._acc: dict[str, torch.Tensor] = {}
        self._w: dict[str, float] = {}
        self._w_diff: dict[str, float] = {}
        self.count = 0
        self.total_weight = 0.0
        #: per parameter, a bound on the largest |value| of its accumulator (where it matters)
        self._bounds: dict[str, float] = {}
        #: why the accumulator cannot be trusted any more (an update failed half-way)
        self._broken: str | None = None
        #: per accumulator dtype, the buffer an update of another dtype is converted into
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def _acc_dtype(self, t: torch.Tensor) -> torch.dtype:
        import torch

        if self.precision == "float64" or not t.is_floating_point() or t.dtype == torch.float64:
            return torch.float64
        return torch.float32

    def add(
        self,
        params: Mapping[str, torch.Tensor],
        weight: float,
        params_type: ParamsType | None = ParamsType.FULL,
        *,
        validate: bool = True,
    ) -> None:
        """Fold one site's update in; rejects the whole update (adding none of it) if invalid."""
        import torch

        if validate:
            check_update(self.global_params, params, weight, params_type)
        if self._broken is not None:
            raise UpdateRejected(f"this round's aggregate is unusable: {self._broken}")
        if weight == 0:
            self.count += 1
            return
        bounds = self._check_overflow(params, weight)
        diff = params_type == ParamsType.DIFF
        try:
            for name, t in params.items():
                acc = self._acc.get(name)
                if acc is None:
                    # a new tensor: never scale the sender's in place (maybe shared memory);
                    # one pass when the dtype is kept
                    dtype = self._acc_dtype(t)
                    acc = self._acc[name] = (
                        torch.mul(t, weight) if t.dtype == dtype else t.to(dtype).mul_(weight)
                    )
                else:
                    self._add_scaled(acc, t, weight)
                self._w[name] = self._w.get(name, 0.0) + weight
                if diff:
                    self._w_diff[name] = self._w_diff.get(name, 0.0) + weight
        except Exception as exc:  # e.g. a large result's file failed to read half-way
            self._broken = f"an update failed half-way through: {exc}"
            raise UpdateRejected(self._broken) from None
        self._bounds.update(bounds)
        self.count += 1
        self.total_weight += weight

    def _add_scaled(self, acc: torch.Tensor, t: torch.Tensor, weight: float) -> None:
        """``acc += weight · t``. When ``t``'s dtype is not the accumulator's (float32 updates
        into float64 sums, the default), in slices converted into one reused buffer: PyTorch's
        mixed-dtype ``add_`` of a large tensor is slow (8 ns an element here, against 1.4 for a
        conversion and a same-dtype ``add_``). The arithmetic is the same: the sum is
        bit-identical."""
        n = t.numel()
        if (
            t.dtype == acc.dtype
            or not t.is_floating_point()  # integer buffers are small; complex is refused
            or n <= _MIX_SLICE
            or t.shape != acc.shape
            or not (t.is_contiguous() and acc.is_contiguous())
        ):
            acc.add_(t, alpha=weight)
            return
        import torch

        buf = self._scratch.get(acc.dtype)
        if buf is None:
            buf = self._scratch[acc.dtype] = torch.empty(_MIX_SLICE, dtype=acc.dtype)
        flat_acc, flat = acc.view(-1), t.view(-1)
        for i in range(0, n, _MIX_SLICE):
            part = flat[i : i + _MIX_SLICE]
            tmp = buf[: part.numel()].copy_(part)
            flat_acc[i : i + part.numel()].add_(tmp, alpha=weight)

    def add_zero_diff(self, weight: float) -> None:
        """Count ``weight`` for an all-zero DIFF update: it shrinks the step from the global
        model without a pass over any tensor (FedBuff's staleness discount)."""
        if weight <= 0:
            return
        for name, g in self.global_params.items():
            if g.is_floating_point():
                self._w[name] = self._w.get(name, 0.0) + weight
                self._w_diff[name] = self._w_diff.get(name, 0.0) + weight
        self.total_weight += weight

    def _check_overflow(
        self, params: Mapping[str, torch.Tensor], weight: float
    ) -> dict[str, float]:
        """Refuse an update that would overflow an accumulator, before adding any of it.

        With float64 accumulators for parameters of at most 32 bits, overflow is impossible:
        every value fits its parameter's dtype and weights are at most MAX_WEIGHT. Float32
        accumulators and float64 parameters keep a bound on each accumulator's largest value
        and check exactly only when the bound says it could overflow.
        """
        import torch

        bounds: dict[str, float] = {}
        for name, t in params.items():
            acc_dtype = self._acc_dtype(t)
            if not t.is_floating_point() or (
                acc_dtype == torch.float64 and t.dtype != torch.float64
            ):
                continue
            limit = torch.finfo(acc_dtype).max
            bound = self._bounds.get(name, 0.0) + weight * _abs_max(t)
            if bound > limit:
                acc = self._acc.get(name)
                trial = t.to(acc_dtype) * weight if acc is None else acc + t.to(acc_dtype) * weight
                if not bool(torch.isfinite(trial).all()):
                    raise UpdateRejected(
                        f"parameter {name!r}: adding this update overflows the {acc_dtype} sum"
                    )
                bound = float(trial.abs().max())
            bounds[name] = bound
        return bounds

    def result(self) -> dict[str, torch.Tensor]:
        """The new global parameters (same names, shapes and dtypes as the global model).

        Consumes the accumulator: call once per round.
        """
        if self._broken is not None:
            raise AggregateUnusable(f"the round's aggregate is unusable: {self._broken}")
        out: dict[str, torch.Tensor] = {}
        for name, g in self.global_params.items():
            w = self._w.get(name, 0.0)
            acc = self._acc.pop(name, None)
            if acc is None or w == 0:
                out[name] = g
                continue
            acc.div_(w)
            w_diff = self._w_diff.get(name, 0.0)
            if w_diff:
                self._add_scaled(acc, g, w_diff / w)
            if not g.is_floating_point():
                acc.round_()
            out[name] = acc.to(g.dtype)
        return out


class MetricsMean:
    """Weighted mean of the numeric metrics sites report, key by key."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._w: dict[str, float] = {}

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        """Fold one site's numeric metrics in; a site with weight 0 does not count."""
        w = weight if weight > 0 else 0.0
        for k, v in metrics.items():
            self._sum[k] = self._sum.get(k, 0.0) + w * v
            self._w[k] = self._w.get(k, 0.0) + w

    def result(self) -> dict[str, float]:
        """Each metric's weighted mean over the sites that reported it."""
        return {k: self._sum[k] / self._w[k] for k in self._sum if self._w[k] > 0}
