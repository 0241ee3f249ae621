"""FedAvgM: federated averaging with server momentum.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification" (2019). The server keeps a momentum buffer of the rounds' model changes::

    Δ = aggregate - global;   v ← μ·v + Δ;   global ← global + η·v

Momentum smooths the direction across rounds, which helps when each round's sample of sites
pulls the model a different way (non-IID data, client sampling). ``server_momentum=0`` and
``server_lr=1`` give FedAvg exactly.

Parameters (besides FedAvg's)
-----------------------------
server_lr:        η, the server learning rate (default 1.0).
server_momentum:  μ, the momentum (default 0.9).

The momentum buffer is checkpointed with the round.
"""

from __future__ import annotations

from typing import Any

from fedctl.aggregators.server_opt import ServerOptimizer
from fedctl.workflows.fedopt import ServerOptimized


class FedAvgM(ServerOptimized):
    """FedAvg with server momentum; see the module docstring."""

    def __init__(
        self,
        num_rounds: int,
        min_clients: int,
        *,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_rounds, min_clients, **kwargs)
        self.optimizer = ServerOptimizer("sgdm", server_lr, momentum=server_momentum)
