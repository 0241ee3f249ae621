"""``FedAvgRecipe``: federated averaging with a PyTorch client script."""

from __future__ import annotations

from typing import Any

from fedctl.recipe.base import Recipe
from fedctl.workflows.base import Workflow


class FedAvgRecipe(Recipe):
    """Federated averaging (McMahan et al., 2017) of the sites' weights or weight changes.

    Arguments: ``name``; ``min_clients`` (results each round needs); ``num_rounds``; ``model``
    (an ``nn.Module``, a state_dict, or a path to .safetensors/.pt weights); ``train_script``
    (path relative to the recipe's folder) and ``train_args`` (its command line);
    ``round_timeout`` seconds per round; ``wait_after_min`` (straggler wait once ``min_clients``
    results are in; None waits for all until the deadline); ``key_metric`` and
    ``key_metric_mode`` choose the best model; ``precision`` of the aggregation accumulator;
    ``task_meta`` JSON values every site receives in ``FLModel.meta``; ``aggregator`` (mean or a
    robust one), ``sample_clients``, ``federated_eval``, ``eval_every``, ``server_eval`` and
    ``cross_site_eval`` (see docs/algorithms.md). Every algorithm recipe takes these too.
    """

    kind = "fedavg"
    supports_homomorphic_encryption = True
    summary = "Federated averaging weighted by local steps (FULL or DIFF updates)."
    paper = (
        "McMahan et al., Communication-Efficient Learning of Deep Networks from "
        "Decentralized Data (AISTATS 2017)"
    )
    example = "recipes/hello_pt"

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.fedavg import FedAvg

        return FedAvg(self.num_rounds, self.min_clients, **self.workflow_kwargs())
