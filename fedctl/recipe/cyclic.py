"""``CyclicRecipe``: cyclic weight transfer, one model passed from site to site."""

from __future__ import annotations

from typing import Any

from fedctl.errors import RecipeError
from fedctl.recipe.base import AGGREGATION_ARGS, Recipe
from fedctl.workflows.base import Workflow


class CyclicRecipe(Recipe):
    """Cyclic weight transfer (Chang et al., 2018): each round the model visits every live site
    in turn (``order``: "fixed", sorted names, or "random", shuffled per round from the run's
    seed); each site trains what the previous one sent. The server never aggregates; a site
    that fails is skipped with the reason. ``num_rounds`` counts cycles; the client script is
    the same as for FedAvg. Arguments that only mean something for server-side aggregation
    (aggregator, sampling, central DP, secure aggregation, HE, federated/server/cross-site
    evaluation) are refused.
    """

    kind = "cyclic"
    supports_central_dp = False
    summary = "One model visits the sites in turn (no aggregation): small consortia."
    paper = (
        "Chang, Balachandar, Lam, Yi, Brown, Beers, Rosen, Rubin, Kalpathy-Cramer, Distributed "
        "deep learning networks among institutions for medical imaging (JAMIA 2018)"
    )
    example = "recipes/cyclic"
    param_docs = {"order": "'fixed' (sorted site names) or 'random' (shuffled per round)"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        order: str = "fixed",
        **kwargs: Any,
    ) -> None:
        self.refuse(
            kwargs,
            AGGREGATION_ARGS,
            "the model goes from site to site and the server never aggregates",
        )
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        if order not in ("fixed", "random"):
            raise RecipeError(f"order must be 'fixed' or 'random', got {order!r}")
        self.order = order

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.cyclic import Cyclic

        return Cyclic(
            self.num_rounds,
            self.min_clients,
            order=self.order,
            round_timeout=self.round_timeout,
            task_meta=self.task_meta,
        )
