"""The differential workload's model: a small MLP."""

import torch
from torch import nn


class Net(nn.Module):
    """8 → 16 → 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def initial_model() -> Net:
    """The job's initial model (the same weights every time)."""
    torch.manual_seed(0)
    return Net()
