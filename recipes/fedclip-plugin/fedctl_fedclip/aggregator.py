"""``ClippedMean``: the weighted mean of the sites' changes, each clipped to an L2 norm."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedctl.aggregators.weighted import UpdateRejected, check_update
from fedctl.codec.model import ParamsType


class ClippedMean:
    """One round's aggregate: ``global + Σ wᵢ·clip(Δᵢ) / Σ wᵢ``.

    ``Δᵢ`` is site i's change to the global model (its weights minus the global ones for a FULL
    update, the update itself for a DIFF), ``clip(Δ) = Δ · min(1, clip_norm / ‖Δ‖₂)`` with the
    norm taken over all floating-point tensors of the update. Memory is one accumulator the size
    of the model, whatever the number of sites. Tensors that are not floating point (counters)
    keep their global value.
    """

    def __init__(self, global_params: Mapping[str, torch.Tensor], clip_norm: float) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
        self.global_params = dict(global_params)
        self.clip_norm = float(clip_norm)
        self.sum = {
            k: torch.zeros_like(v, dtype=torch.float64)
            for k, v in self.global_params.items()
            if v.is_floating_point()
        }
        self.count = 0
        self.total_weight = 0.0
        #: how many updates were longer than clip_norm (and so scaled down)
        self.clipped = 0

    def add(
        self,
        params: Mapping[str, torch.Tensor],
        weight: float,
        params_type: ParamsType | None = None,
        *,
        validate: bool = True,
    ) -> None:
        """Fold one site's update in, or reject it whole (UpdateRejected)."""
        if validate:
            check_update(self.global_params, params, weight)
        missing = sorted(set(self.sum) - set(params))
        if missing:
            raise UpdateRejected(f"clipped mean needs every parameter; {missing[0]!r} is missing")
        diff = params_type is not None and ParamsType(params_type) == ParamsType.DIFF
        deltas = {}
        for k in self.sum:
            p = params[k].to(torch.float64)
            deltas[k] = p if diff else p - self.global_params[k].to(torch.float64)
        norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
        scale = 1.0
        if norm > self.clip_norm:
            scale = self.clip_norm / norm
            self.clipped += 1
        for k, d in deltas.items():
            self.sum[k].add_(d, alpha=float(weight) * scale)
        self.count += 1
        self.total_weight += float(weight)

    def result(self) -> dict[str, torch.Tensor]:
        """The new global parameters."""
        if self.count == 0 or self.total_weight <= 0:
            raise UpdateRejected("clipped mean: no update with a positive weight this round")
        out = {}
        for k, g in self.global_params.items():
            if k in self.sum:
                out[k] = (g.to(torch.float64) + self.sum[k] / self.total_weight).to(g.dtype)
            else:
                out[k] = g.clone()
        return out
