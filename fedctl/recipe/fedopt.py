"""``FedAdamRecipe``, ``FedYogiRecipe``, ``FedAdagradRecipe``: adaptive server optimizers."""

from __future__ import annotations

from typing import Any, ClassVar

from fedctl.recipe.checks import check_number
from fedctl.recipe.fedavg import FedAvgRecipe
from fedctl.workflows.base import Workflow

_PAPER = "Reddi et al., Adaptive Federated Optimization (ICLR 2021)"
_DOCS = {
    "eta": "server learning rate",
    "beta1": "first-moment decay",
    "beta2": "second-moment decay",
    "tau": "adaptivity: added to sqrt(v); v starts at tau^2",
}


class FedAdamRecipe(FedAvgRecipe):
    """FedAdam (Reddi et al., 2021): Adam on the server's pseudo-gradient ``aggregate - global``.

    ``eta`` (server learning rate), ``beta1``, ``beta2``, ``tau``; every FedAvgRecipe argument
    applies as well. Start with eta around 0.01 and tune it (it matters more than the betas).
    """

    kind = "fedadam"
    summary = "Adam on the server (FedOpt): for slow or unstable averaging."
    paper = _PAPER
    example = "recipes/fedopt"
    param_docs = _DOCS
    workflow_name: ClassVar[str] = "FedAdam"

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        eta: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        self.eta = check_number("eta", eta, gt=0)
        self.beta1 = check_number("beta1", beta1, ge=0, lt=1)
        self.beta2 = check_number("beta2", beta2, ge=0, lt=1)
        self.tau = check_number("tau", tau, gt=0)

    def optimizer_args(self) -> dict[str, float]:
        """The server optimizer's arguments."""
        return {"eta": self.eta, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def build_workflow(self) -> Workflow:
        from fedctl.workflows import fedopt

        cls = getattr(fedopt, self.workflow_name)
        return cls(
            self.num_rounds, self.min_clients, **self.optimizer_args(), **self.workflow_kwargs()
        )


class FedYogiRecipe(FedAdamRecipe):
    """FedYogi (Reddi et al., 2021): Yogi on the server's pseudo-gradient; its additive
    second-moment update is more stable than Adam's when updates are sparse or noisy.

    Same arguments as FedAdamRecipe.
    """

    kind = "fedyogi"
    summary = "Yogi on the server (FedOpt): Adam's steadier sibling."
    example = "recipes/fedopt/fedyogi.py"
    workflow_name = "FedYogi"


class FedAdagradRecipe(FedAdamRecipe):
    """FedAdagrad (Reddi et al., 2021): Adagrad on the server's pseudo-gradient.

    ``eta`` (default 0.1), ``beta1`` (default 0: classic Adagrad), ``tau``; every FedAvgRecipe
    argument applies as well.
    """

    kind = "fedadagrad"
    summary = "Adagrad on the server (FedOpt): per-parameter step sizes that only shrink."
    example = "recipes/fedopt/fedadagrad.py"
    workflow_name = "FedAdagrad"
    param_docs = {k: v for k, v in _DOCS.items() if k != "beta2"}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        eta: float = 0.1,
        beta1: float = 0.0,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name,
            min_clients,
            num_rounds,
            model,
            train_script,
            train_args,
            eta=eta,
            beta1=beta1,
            tau=tau,
            **kwargs,
        )

    @classmethod
    def arg_names(cls) -> list[str]:
        return [n for n in super().arg_names() if n != "beta2"]

    def optimizer_args(self) -> dict[str, float]:
        return {"eta": self.eta, "beta1": self.beta1, "tau": self.tau}
