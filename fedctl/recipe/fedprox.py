"""``FedProxRecipe``: FedAvg with a proximal term in every site's loss."""

from __future__ import annotations

from typing import Any

from fedctl.recipe.checks import check_number
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.workflows.base import Workflow


class FedProxRecipe(FedAvgRecipe):
    """FedProx (Li et al., 2020): sites minimise ``loss + (mu/2)·‖w - w_global‖²``.

    The server sends ``mu`` in ``FLModel.meta["fedprox_mu"]``; the client script adds the term
    with ``loss = loss + flare.proximal_term(model, received)``. ``mu=0`` is FedAvg. Every
    FedAvgRecipe argument applies as well.
    """

    kind = "fedprox"
    supports_homomorphic_encryption = True
    summary = "FedAvg plus a proximal term in local losses: limits drift on non-IID data."
    paper = (
        "Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, Federated Optimization in "
        "Heterogeneous Networks (MLSys 2020)"
    )
    example = "recipes/fedprox"
    param_docs = {"mu": "proximal coefficient mu ≥ 0 (0 is FedAvg)"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        mu: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.mu = check_number("mu", mu, ge=0)

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.fedprox import FedProx

        return FedProx(self.num_rounds, self.min_clients, mu=self.mu, **self.workflow_kwargs())
