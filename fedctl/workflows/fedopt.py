"""FedOpt: FedAdam, FedYogi and FedAdagrad, adaptive optimizers on the server.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization" (ICLR 2021). Sites train as in FedAvg; the server treats the change of the
averaged model, ``Δ = aggregate - global``, as a pseudo-gradient and applies Adam, Yogi or
Adagrad to it (formulas in :mod:`fedctl.aggregators.server_opt`). Helps when plain averaging
makes slow or unstable progress (sparse or badly scaled gradients, heterogeneous sites), and
makes a server learning rate available. The aggregate may come from any aggregator (robust
ones included).

Parameters (besides FedAvg's)
-----------------------------
eta:    server learning rate (FedAdam/FedYogi default 0.01, FedAdagrad 0.1).
beta1:  first-moment decay (default 0.9; FedAdagrad 0, plain Adagrad).
beta2:  second-moment decay (default 0.99; not used by FedAdagrad).
tau:    adaptivity: added to √v, and ``v`` starts at τ² (default 1e-3).

The optimizer state (``m``, ``v``) is checkpointed with the round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fedctl.aggregators.server_opt import ServerOptimizer
from fedctl.workflows.base import WorkflowContext
from fedctl.workflows.fedavg import FedAvg

if TYPE_CHECKING:
    import torch


class ServerOptimized(FedAvg):
    """FedAvg whose server update is a step of ``self.optimizer``, set by the subclasses
    (FedOpt, FedAvgM); the optimizer's state is checkpointed with the round."""

    optimizer: ServerOptimizer

    def server_update(
        self,
        ctx: WorkflowContext,
        global_params: dict[str, torch.Tensor],
        aggregate: dict[str, torch.Tensor],
        rnd: int,
    ) -> dict[str, torch.Tensor]:
        return self.optimizer.step(global_params, aggregate)

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), **super().state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.optimizer.load_state_dict(state)


class FedOpt(ServerOptimized):
    """FedAvg whose server update is a :class:`ServerOptimizer` step on the aggregate."""

    optimizer_kind: ClassVar[str] = "adam"

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        eta: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_rounds, min_clients, **kwargs)
        self.optimizer = ServerOptimizer(
            self.optimizer_kind, eta, beta1=beta1, beta2=beta2, tau=tau
        )


class FedAdam(FedOpt):
    """Adam on the server's pseudo-gradient."""

    optimizer_kind = "adam"


class FedYogi(FedOpt):
    """Yogi (Adam with an additive, sign-controlled second moment) on the pseudo-gradient."""

    optimizer_kind = "yogi"


class FedAdagrad(FedOpt):
    """Adagrad on the pseudo-gradient."""

    optimizer_kind = "adagrad"

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        eta: float = 0.1,
        beta1: float = 0.0,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("beta2", None)
        super().__init__(num_rounds, min_clients, eta=eta, beta1=beta1, tau=tau, **kwargs)
