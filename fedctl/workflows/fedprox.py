"""FedProx: FedAvg whose sites add a proximal term to their local loss.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks"
(MLSys 2020). Each site minimises ``F_i(w) + (μ/2)·‖w - w_global‖²`` instead of ``F_i(w)``: the
term pulls local training back towards the round's global model, which limits client drift
when sites' data differ or when they do different amounts of local work. The server side is
FedAvg; it sends ``μ`` to every site in ``FLModel.meta["fedprox_mu"]`` and the script adds the
term with one line::

    loss = loss + flare.proximal_term(model, received)

``mu=0`` is FedAvg exactly. Typical values: 0.001 – 1 (tune on validation data).

Parameters (besides FedAvg's)
-----------------------------
mu:  the proximal coefficient μ ≥ 0 (default 0.01).
"""

from __future__ import annotations

from typing import Any

from fedctl.codec.keys import FEDPROX_MU_KEY
from fedctl.workflows.base import WorkflowContext
from fedctl.workflows.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg that sends ``mu`` to the sites; see the module docstring."""

    def __init__(self, num_rounds: int, min_clients: int, *, mu: float = 0.01, **kwargs: Any):
        super().__init__(num_rounds, min_clients, **kwargs)
        if mu < 0:
            raise ValueError(f"FedProx mu must be ≥ 0, got {mu}")
        self.mu = float(mu)

    def task_meta_for(self, ctx: WorkflowContext, rnd: int) -> dict[str, Any]:
        return {**super().task_meta_for(ctx, rnd), FEDPROX_MU_KEY: self.mu}
