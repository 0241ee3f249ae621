"""``ScaffoldRecipe``: control variates against client drift."""

from __future__ import annotations

from typing import Any

from fedctl.recipe.checks import check_number
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.workflows.base import Workflow


class ScaffoldRecipe(FedAvgRecipe):
    """SCAFFOLD (Karimireddy et al., 2020): server and site control variates correct each
    local gradient step towards the global direction.

    The client script uses ``flare.Scaffold(model, received, optimizer)``, calls
    ``scaffold.correct()`` after each ``loss.backward()`` and sends
    ``scaffold.update(flare.FLModel(...))``. ``server_lr`` is the global step size η_g. Every
    FedAvgRecipe argument applies as well (a robust ``aggregator`` applies to the model part).
    """

    kind = "scaffold"
    supports_central_dp = False
    summary = "Control variates correct client drift: strong on label-skewed (non-IID) data."
    paper = (
        "Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, SCAFFOLD: Stochastic Controlled "
        "Averaging for Federated Learning (ICML 2020)"
    )
    example = "recipes/scaffold"
    param_docs = {"server_lr": "η_g, global step size on the averaged change"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        server_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.server_lr = check_number("server_lr", server_lr, gt=0)

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.scaffold import Scaffold

        return Scaffold(
            self.num_rounds, self.min_clients, server_lr=self.server_lr, **self.workflow_kwargs()
        )
