"""A small classifier for the synthetic hello_pt task."""

from torch import nn


class Net(nn.Module):
    """Two-layer MLP: 32 features → 10 classes."""

    def __init__(self, in_features: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.layers(x)
