"""``FedBuffRecipe`` and ``FedAsyncRecipe``: asynchronous aggregation, no round barrier."""

from __future__ import annotations

from typing import Any

from fedctl.errors import RecipeError
from fedctl.recipe.base import AGGREGATION_ARGS, Recipe
from fedctl.workflows.base import Workflow

#: recipe arguments that need a synchronous round, which an asynchronous job never has
_SYNCHRONOUS_ONLY = (
    *(a for a in AGGREGATION_ARGS if a != "server_eval"),  # it evaluates each new model
    "wait_after_min",
)
_STALENESS_DOCS = {
    "concurrency": "sites training at once (None: every site); one that answers gets new work",
    "staleness": "'constant', 'polynomial' ((s+1)^-a) or 'hinge' (1 up to b, then 1/(a(s-b)+1))",
    "staleness_a": "the staleness function's a",
    "staleness_b": "the hinge's b (versions)",
    "max_staleness": "drop (and log) an update older than this many versions (None: never)",
}


class _AsyncRecipe(Recipe):
    """What FedBuff and FedAsync share: validation of the asynchronous arguments."""

    supports_central_dp = False

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        concurrency: int | None = None,
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        max_staleness: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.refuse(
            kwargs,
            _SYNCHRONOUS_ONLY,
            "there is no synchronous round (every update is aggregated as it comes)",
        )
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        from fedctl.workflows.asynchronous import staleness_weight

        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise RecipeError(f"concurrency must be a positive integer, got {concurrency!r}")
        for what, value in (("staleness_a", staleness_a), ("staleness_b", staleness_b)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise RecipeError(f"{what} must be a number ≥ 0, got {value!r}")
        try:
            staleness_weight(staleness, 0, staleness_a, staleness_b)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        if max_staleness is not None and (
            isinstance(max_staleness, bool)
            or not isinstance(max_staleness, int)
            or max_staleness < 0
        ):
            raise RecipeError(f"max_staleness must be an integer ≥ 0, got {max_staleness!r}")
        self.concurrency = concurrency
        self.staleness = staleness
        self.staleness_a = staleness_a
        self.staleness_b = staleness_b
        self.max_staleness = max_staleness

    def async_kwargs(self) -> dict[str, Any]:
        """What both asynchronous workflows take from the recipe."""
        server_eval = self.workflow_kwargs()["server_eval"]
        return {
            "concurrency": self.concurrency,
            "staleness": self.staleness,
            "staleness_a": self.staleness_a,
            "staleness_b": self.staleness_b,
            "max_staleness": self.max_staleness,
            "round_timeout": self.round_timeout,
            "task_meta": self.task_meta,
            "server_eval": server_eval,
            "eval_every": self.eval_every,
        }


class FedBuffRecipe(_AsyncRecipe):
    """FedBuff (Nguyen et al., AISTATS 2022): updates go into a buffer; every ``buffer_size``
    of them make a new global model, each weighted by its steps and its staleness (by default
    1/√(1 + staleness)), with server step ``server_lr``. ``num_rounds`` counts new global
    models. Same client script as FedAvg. See docs/algorithms.md."""

    kind = "fedbuff"
    summary = "Buffered asynchronous aggregation: fast sites never wait for slow ones."
    paper = (
        "Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, Federated Learning with Buffered "
        "Asynchronous Aggregation (AISTATS 2022)"
    )
    example = "recipes/async/fedbuff.py"
    param_docs = {
        "buffer_size": "K: updates per new global model (None: min_clients)",
        "server_lr": "the server's step size on the buffer's mean update",
        **_STALENESS_DOCS,
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
        buffer_size: int | None = None,
        server_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        if buffer_size is not None and (
            isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1
        ):
            raise RecipeError(f"buffer_size must be a positive integer, got {buffer_size!r}")
        if isinstance(server_lr, bool) or not isinstance(server_lr, int | float) or server_lr <= 0:
            raise RecipeError(f"server_lr must be a positive number, got {server_lr!r}")
        self.buffer_size = buffer_size
        self.server_lr = server_lr

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.asynchronous import AsyncAggregation

        return AsyncAggregation(
            self.num_rounds,
            self.min_clients,
            mode="fedbuff",
            buffer_size=self.buffer_size,
            server_lr=self.server_lr,
            **self.async_kwargs(),
        )


class FedAsyncRecipe(_AsyncRecipe):
    """FedAsync (Xie et al., 2019): every update makes a new global model,
    ``x ← (1 − α·s)·x + α·s·y`` with ``s`` the staleness function. ``num_rounds`` counts new
    global models. Same client script as FedAvg. See docs/algorithms.md."""

    kind = "fedasync"
    summary = "Asynchronous mixing: every update makes a new model, discounted by its staleness."
    paper = "Xie, Koyejo, Gupta, Asynchronous Federated Optimization (2019)"
    example = "recipes/async/fedasync.py"
    param_docs = {"alpha": "the mixing weight α in (0, 1]", **_STALENESS_DOCS}

    def __init__(
        self,
        name: str,
        min_clients: int,
        num_rounds: int,
        model: Any,
        train_script: str,
        train_args: str = "",
        *,
        alpha: float = 0.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, min_clients, num_rounds, model, train_script, train_args, **kwargs)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise RecipeError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha

    def build_workflow(self) -> Workflow:
        from fedctl.workflows.asynchronous import AsyncAggregation

        return AsyncAggregation(
            self.num_rounds,
            self.min_clients,
            mode="fedasync",
            alpha=self.alpha,
            **self.async_kwargs(),
        )
