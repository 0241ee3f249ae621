"""``FedBNRecipe`` and ``PartialSharingRecipe``: parameters that stay on each site."""

from __future__ import annotations

from typing import Any

from fedctl.errors import RecipeError
from fedctl.recipe.checks import check_bool
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.workflows.base import Workflow


def _patterns(what: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise RecipeError(f"{what} must be a list of glob patterns, e.g. ['head.*'], got {value!r}")
    if not all(isinstance(p, str) and p for p in value):
        raise RecipeError(f"{what} must hold non-empty strings, got {value!r}")
    return list(value)


class FedBNRecipe(FedAvgRecipe):
    """FedBN (Li et al., 2021): batch-norm layers stay on each site, the rest is averaged.

    The client script loads with ``pz = flare.personalize(model, received)`` and sends
    ``pz.shared()``. ``local`` adds glob patterns of further parameters to keep local. Every
    FedAvgRecipe argument applies as well.
    """

    kind = "fedbn"
    supports_central_dp = False
    summary = "Batch-norm layers stay local: for feature skew (scanners, sensors, populations)."
    paper = (
        "Li, Jiang, Zhang, Kamp, Dou, FedBN: Federated Learning on Non-IID Features via Local "
        "Batch Normalization (ICLR 2021)"
    )
    example = "recipes/personalization"
    param_docs = {"local": "glob patterns of further parameters that stay on each site"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        local: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.local = _patterns("local", local)
        if type(self) is FedBNRecipe:
            self._check_split()

    def _local_split(self) -> tuple[int, int]:
        """How many of the initial model's entries stay local under :meth:`personalization`,
        and how many entries there are."""
        from fedctl.codec.keys import bn_prefixes_from_names, stays_local

        params = self.initial_params()
        spec = self.personalization()
        bn = bn_prefixes_from_names(set(params))
        return sum(stays_local(k, spec, bn) for k in params), len(params)

    def _check_split(self) -> None:
        local, total = self._local_split()
        if not local:
            raise RecipeError(
                f"{self.kind}: the model has no batch-norm layers with running statistics "
                "(nothing would stay local)"
            )
        if local == total:
            raise RecipeError(f"{self.kind}: every parameter would stay local (nothing is shared)")

    def personalization(self) -> dict[str, Any]:
        """The workflow's personalization arguments."""
        return {"fedbn": True, "local": self.local}

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.personalized import Personalized

        return Personalized(
            self.num_rounds, self.min_clients, **self.personalization(), **self.workflow_kwargs()
        )


class PartialSharingRecipe(FedBNRecipe):
    """Partial sharing / FedPer (Arivazhagan et al., 2019): glob patterns over parameter names
    decide what is federated (``shared``) and what stays on each site (``local``).

    E.g. ``local=["head.*"]`` keeps a personal head per site; ``shared=["body.*"]`` federates
    only the body. The client script is the same as for FedBN (``flare.personalize``).
    """

    kind = "fedper"
    supports_central_dp = False
    summary = "Partial sharing (FedPer): a key pattern decides which parameters are federated."
    paper = (
        "Arivazhagan, Aggarwal, Singh, Choudhary, Federated Learning with Personalization "
        "Layers (2019)"
    )
    example = "recipes/personalization/fedper.py"
    param_docs = {
        "shared": "glob patterns of the federated parameters (None: all not local)",
        "local": "glob patterns of the parameters that stay on each site",
        "fedbn": "also keep batch-norm layers local",
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
        shared: list[str] | None = None,
        local: list[str] | None = None,
        fedbn: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name, min_clients, num_rounds, model, train_script, train_args, local=local, **kwargs
        )
        self.shared = _patterns("shared", shared)
        self.fedbn = check_bool("fedbn", fedbn)
        if self.shared is None and not self.local and not self.fedbn:
            raise RecipeError("fedper needs shared or local patterns (e.g. local=['head.*'])")
        self._check_split()

    def _check_split(self) -> None:
        local, total = self._local_split()
        if local == total:
            raise RecipeError("fedper: the patterns keep every parameter local (nothing is shared)")
        if not local:
            raise RecipeError("fedper: the patterns match no parameter (everything is shared)")

    def personalization(self) -> dict[str, Any]:
        return {"fedbn": self.fedbn, "shared": self.shared, "local": self.local}
