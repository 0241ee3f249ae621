"""``FedClip``: fedctl's FedAvg workflow with the clipped mean as its aggregator."""

from __future__ import annotations

from typing import Any

import torch

from fedctl.workflows.fedavg import FedAvg
from fedctl_fedclip.aggregator import ClippedMean


class FedClip(FedAvg):
    """Federated averaging of clipped updates. Rounds, deadlines, sampling, evaluation and
    checkpoints are FedAvg's; only the round's aggregator differs."""

    def __init__(self, num_rounds: int, min_clients: int, *, clip_norm: float, **kwargs: Any):
        super().__init__(num_rounds, min_clients, **kwargs)
        self.clip_norm = clip_norm

    def new_aggregator(self, global_params: dict[str, torch.Tensor]) -> ClippedMean:
        return ClippedMean(global_params, self.clip_norm)
