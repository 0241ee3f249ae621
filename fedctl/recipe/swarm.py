"""``SwarmRecipe``: swarm learning, the sites aggregate among themselves and the server relays
payloads sealed from site to site."""

from __future__ import annotations

from typing import Any

from fedctl.errors import RecipeError
from fedctl.recipe.base import AGGREGATION_ARGS, Recipe
from fedctl.workflows.base import Workflow

#: recipe arguments that need the server to see models, which a swarm server never does
_SERVER_SIDE = (*AGGREGATION_ARGS, "wait_after_min", "compression")


class SwarmRecipe(Recipe):
    """Swarm learning (a client-controlled workflow): each round a site chosen in rotation
    aggregates the others' updates (FedAvg's weighted mean) and seals the new model for every
    site; the server only relays payloads sealed end to end between the sites' identities
    (X25519 + AES-GCM), and never holds a model it could open. An aggregator that fails is
    replaced and the round goes on. Each site keeps the final model in its own folder. The
    client script is FedAvg's. Arguments that need the server to see models are refused."""

    kind = "swarm"
    supports_central_dp = False
    summary = "Sites aggregate among themselves; the server relays sealed payloads it cannot read."
    paper = (
        "Warnat-Herresthal et al., Swarm Learning for decentralized and confidential clinical "
        "machine learning (Nature 2021)"
    )
    example = "recipes/swarm"

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
        self.refuse(
            kwargs,
            _SERVER_SIDE,
            "the server never sees a model (the sites aggregate among themselves)",
        )
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        if self.privacy:
            from fedctl.privacy.filters import FilterChain

            chain = FilterChain.from_specs(self.privacy)
            for point in ("result_in", "aggregate_out"):
                if chain.at(point):
                    raise RecipeError(
                        f"swarm runs no filters at {point}: the server never sees a model "
                        "(use result_out or task_in, which run on the sites)"
                    )

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.swarm import Swarm

        return Swarm(
            self.num_rounds,
            self.min_clients,
            round_timeout=self.round_timeout,
            task_meta=self.task_meta,
        )
