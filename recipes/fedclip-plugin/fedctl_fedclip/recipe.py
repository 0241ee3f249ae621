"""``FedClipRecipe``: the recipe kind ``fedclip`` (registered by this package's entry point)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.errors import RecipeError
from fedctl.recipe import FedAvgRecipe
from fedctl.recipe.checks import check_number

if TYPE_CHECKING:
    from fedctl.workflows.base import Workflow


class FedClipRecipe(FedAvgRecipe):
    """FedAvg in which each site's change to the global model is clipped to ``clip_norm``.

    Takes every FedAvgRecipe argument (except ``aggregator``: the clipped mean is this
    algorithm's aggregator) and ``clip_norm``, the largest L2 norm a site's update keeps.
    """

    kind = "fedclip"
    summary = "FedAvg of site updates clipped to an L2 norm (example plugin)."
    paper = (
        "McMahan, Ramage, Talwar, Zhang, Learning Differentially Private Recurrent Language "
        "Models (ICLR 2018): the clipping step"
    )
    example = "recipes/fedclip"
    param_docs = {"clip_norm": "largest L2 norm of a site's change to the global model"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        clip_norm: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("aggregator") not in (None, "mean"):
            raise RecipeError("fedclip aggregates with its clipped mean; leave aggregator unset")
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.clip_norm = check_number("clip_norm", clip_norm, gt=0)

    def build_workflow(self) -> Workflow:
        from fedctl_fedclip.workflow import FedClip

        return FedClip(
            self.num_rounds, self.min_clients, clip_norm=self.clip_norm, **self.workflow_kwargs()
        )
