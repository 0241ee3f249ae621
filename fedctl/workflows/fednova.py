"""FedNova: normalised averaging that corrects for different amounts of local work.

Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization" (NeurIPS 2020). When sites run different numbers of local steps τ_i,
FedAvg's average is biased towards the sites that did more steps, and the model converges to the
optimum of a different objective. FedNova averages each site's change *per step* and rescales::

    d_i = (x_i - x) / a_i                 (a_i = τ_i for plain local SGD)
    τ_eff = Σ p_i·a_i / Σ p_i
    x ← x + τ_eff · Σ p_i·d_i / Σ p_i

with ``p_i`` the site's data weight. With equal steps everywhere it is FedAvg exactly.
Sites report ``meta["NUM_STEPS_CURRENT_ROUND"]`` (τ_i, required) and, optionally,
``meta["NUM_SAMPLES"]`` (p_i; 1 when absent). With local momentum ρ, ``a_i`` is
``(τ_i - ρ(1 - ρ^τ_i)/(1 - ρ)) / (1 - ρ)`` (the paper's formula for SGD with momentum).
Integer tensors and batch-norm running statistics take the plain weighted mean.

Parameters (besides FedAvg's)
-----------------------------
local_momentum:  ρ, the momentum of the sites' local SGD (default 0).

FedNova is its own averaging rule, so it takes no robust ``aggregator``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.select import parse_aggregator
from fedctl.aggregators.server_opt import scaled_step
from fedctl.aggregators.weighted import UpdateRejected, check_update
from fedctl.codec.keys import NUM_SAMPLES_KEY
from fedctl.codec.model import NUM_STEPS_KEY, TaskResult
from fedctl.workflows.base import WorkflowContext
from fedctl.workflows.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedctl.aggregators.base import Aggregator


def norm_factor(steps: float, momentum: float = 0.0) -> float:
    """FedNova's ``a_i`` for ``steps`` local SGD steps with momentum ρ (``steps`` when ρ = 0)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def _number(meta: dict[str, Any], key: str) -> float | None:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


class FedNova(FedAvg):
    """Normalised averaging; see the module docstring."""

    #: its aggregation normalises each site's update by its own step count
    supports_secure_aggregation = False

    def __init__(
        self, num_rounds: int, min_clients: int, *, local_momentum: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(num_rounds, min_clients, **kwargs)
        if parse_aggregator(self.aggregator)[0] != "mean":
            raise ValueError("fednova does its own normalised averaging; it takes no aggregator")
        if not 0 <= local_momentum < 1:
            raise ValueError(f"fednova local_momentum must be in [0, 1), got {local_momentum}")
        self.local_momentum = float(local_momentum)
        self._p = self._pa = self._p_over_a = 0.0

    def weight_of(self, ctx: WorkflowContext, result: TaskResult) -> float:
        """The site's data weight p_i: ``meta["NUM_SAMPLES"]``, 1 when absent."""
        assert result.model is not None
        p = _number(result.model.meta or {}, NUM_SAMPLES_KEY)
        return p if p is not None and p >= 0 else 1.0

    def new_aggregator(self, global_params: dict[str, torch.Tensor]) -> Aggregator:
        self._p = self._pa = self._p_over_a = 0.0
        return super().new_aggregator(global_params)

    def add_result(
        self,
        ctx: WorkflowContext,
        agg: Aggregator,
        global_params: dict[str, torch.Tensor],
        result: TaskResult,
        weight: float,
    ) -> None:
        assert result.model is not None and result.model.params is not None
        steps = _number(result.model.meta or {}, NUM_STEPS_KEY)
        if steps is None or steps <= 0:
            raise UpdateRejected(
                f"fednova needs meta['{NUM_STEPS_KEY}'] > 0 (the local steps), "
                f"got {(result.model.meta or {}).get(NUM_STEPS_KEY)!r}"
            )
        a = norm_factor(steps, self.local_momentum)
        check_update(global_params, result.model.params, weight, result.model.params_type)
        # The weighted mean with weights p/a gives Σ (p/a)·Δ / Σ (p/a); server_update rescales.
        agg.add(result.model.params, weight / a, result.model.params_type, validate=False)
        self._p += weight
        self._pa += weight * a
        self._p_over_a += weight / a

    def server_update(
        self,
        ctx: WorkflowContext,
        global_params: dict[str, torch.Tensor],
        aggregate: dict[str, torch.Tensor],
        rnd: int,
    ) -> dict[str, torch.Tensor]:
        if self._p <= 0 or self._p_over_a <= 0:
            return aggregate
        # x + τ_eff·Σp·d/Σp = x + (Σpa/Σp)·(Σ(p/a)/Σp)·(mean_{p/a}(Δ))
        scale = (self._pa / self._p) * (self._p_over_a / self._p)
        if math.isclose(scale, 1.0, rel_tol=1e-12):
            return aggregate
        return scaled_step(global_params, aggregate, scale)
