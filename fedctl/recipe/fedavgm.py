"""``FedAvgMRecipe``: federated averaging with server momentum."""

from __future__ import annotations

from typing import Any

from fedctl.recipe.checks import check_number
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.workflows.base import Workflow


class FedAvgMRecipe(FedAvgRecipe):
    """FedAvgM (Hsu et al., 2019): ``v ← μ·v + Δ``, ``global ← global + η·v`` on the server.

    ``server_lr`` is η and ``server_momentum`` μ; η = 1, μ = 0 is FedAvg. Every FedAvgRecipe
    argument applies as well.
    """

    kind = "fedavgm"
    summary = "FedAvg with server momentum and a server learning rate."
    paper = (
        "Hsu, Qi, Brown, Measuring the Effects of Non-Identical Data Distribution for "
        "Federated Visual Classification (2019)"
    )
    example = "recipes/fedopt/fedavgm.py"
    param_docs = {
        "server_lr": "η, server learning rate on the averaged change",
        "server_momentum": "μ, server momentum (0: none)",
    }

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
        server_momentum: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.server_lr = check_number("server_lr", server_lr, gt=0)
        self.server_momentum = check_number("server_momentum", server_momentum, ge=0, lt=1)

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.fedavgm import FedAvgM

        return FedAvgM(
            self.num_rounds,
            self.min_clients,
            server_lr=self.server_lr,
            server_momentum=self.server_momentum,
            **self.workflow_kwargs(),
        )
