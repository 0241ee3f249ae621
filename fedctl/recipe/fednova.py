"""``FedNovaRecipe``: normalised averaging for sites that do different amounts of local work."""

from __future__ import annotations

from typing import Any

from fedctl.aggregators.select import parse_aggregator
from fedctl.errors import RecipeError
from fedctl.recipe.checks import check_number
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.workflows.base import Workflow


class FedNovaRecipe(FedAvgRecipe):
    """FedNova (Wang et al., 2020): each site's change is divided by its local steps, averaged
    with data weights, and rescaled by the effective number of steps.

    Sites report ``meta["NUM_STEPS_CURRENT_ROUND"]`` (required) and ``meta["NUM_SAMPLES"]``
    (their data weight; 1 if absent). ``local_momentum`` is the momentum of the sites' local
    SGD. Equal steps everywhere give FedAvg. Takes no robust ``aggregator``.
    """

    kind = "fednova"
    supports_central_dp = False
    summary = "Normalised averaging: corrects for sites doing different numbers of local steps."
    paper = (
        "Wang, Liu, Liang, Joshi, Poor, Tackling the Objective Inconsistency Problem in "
        "Heterogeneous Federated Optimization (NeurIPS 2020)"
    )
    example = "recipes/fednova"
    param_docs = {"local_momentum": "momentum of the sites' local SGD (for the normalisation)"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        local_momentum: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.local_momentum = check_number("local_momentum", local_momentum, ge=0, lt=1)
        if parse_aggregator(self.aggregator)[0] != "mean":
            raise RecipeError("fednova does its own normalised averaging; it takes no aggregator")

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.fednova import FedNova

        return FedNova(
            self.num_rounds,
            self.min_clients,
            local_momentum=self.local_momentum,
            **self.workflow_kwargs(),
        )
