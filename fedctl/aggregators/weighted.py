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
from typing import TYPE_CHECKING

from fedctl.codec.model import ParamsType
from fedctl.errors import FedctlError

if TYPE_CHECKING:
    import torch


class UpdateRejected(FedctlError):
    """A site's update cannot be aggregated (unknown key, wrong shape, NaN, bad weight)."""


PRECISIONS = ("float64", "float32")


def check_update(
    global_params: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    weight: float,
) -> None:
    """Raise UpdateRejected unless ``params`` can be aggregated into ``global_params``."""

    if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight):
        raise UpdateRejected(f"aggregation weight must be a finite number, got {weight!r}")
    if weight < 0:
        raise UpdateRejected(f"aggregation weight must be ≥ 0, got {weight}")
    batch: list[tuple[str, torch.Tensor]] = []
    batch_bytes = 0
    for name, t in params.items():
        g = global_params.get(name)
        if g is None:
            raise UpdateRejected(f"unknown parameter {name!r} (not in the global model)")
        if t.shape != g.shape:
            raise UpdateRejected(
                f"parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(g.shape)}"
            )
        if t.is_floating_point() and t.numel():
            batch.append((name, t))
            batch_bytes += t.numel() * t.element_size()
            if batch_bytes >= _CHECK_BATCH_BYTES:  # bounded memory when params load lazily
                _check_finite(batch)
                batch, batch_bytes = [], 0
    _check_finite(batch)


#: finiteness is checked in fused passes over at most this many bytes of tensors
_CHECK_BATCH_BYTES = 64 * 1024 * 1024


def _check_finite(batch: list[tuple[str, torch.Tensor]]) -> None:
    import torch

    if not batch:
        return
    norms = torch._foreach_norm([t for _, t in batch])
    if all(math.isfinite(float(n)) for n in norms):
        return
    # The fused pass found something; name it (a norm can also overflow on huge values).
    for name, t in batch:
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"parameter {name!r} contains NaN or infinite values")


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
        if validate:
            check_update(self.global_params, params, weight)
        self.count += 1
        self.total_weight += weight
        if weight == 0:
            return
        diff = params_type == ParamsType.DIFF
        for name, t in params.items():
            acc = self._acc.get(name)
            if acc is None:
                # copy=True: never scale the sender's tensor in place (it may be shared memory)
                acc = self._acc[name] = t.to(self._acc_dtype(t), copy=True).mul_(weight)
            else:
                acc.add_(t, alpha=weight)
            self._w[name] = self._w.get(name, 0.0) + weight
            if diff:
                self._w_diff[name] = self._w_diff.get(name, 0.0) + weight

    def result(self) -> dict[str, torch.Tensor]:
        """The new global parameters (same names, shapes and dtypes as the global model).

        Consumes the accumulator: call once per round.
        """
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
                acc.add_(g, alpha=w_diff / w)
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
