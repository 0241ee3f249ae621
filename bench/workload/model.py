"""Benchmark models: an MLP sized by its parameter count."""

import torch
from torch import nn


class MLP(nn.Module):
    """in → hidden → hidden → classes."""

    def __init__(self, in_features: int = 128, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(size: str) -> MLP:
    """'small' ≈ 100k parameters, 'large' ≈ 100M parameters."""
    if size == "small":
        return MLP(128, 256, 10)  # 101,386 parameters
    if size == "large":
        return MLP(1024, 9000, 1024)  # 99,451,024 parameters (≈ 398 MB fp32)
    raise ValueError(size)
