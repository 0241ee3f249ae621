"""flowerapp: the model, each partition's synthetic data, and the training loop."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This partition's data: its own generator, labels skewed by partition."""
    g = torch.Generator().manual_seed(1000 + partition_id)
    x = torch.randn(128, 16, generator=g)
    y = (x[:, :4].argmax(1) + partition_id) % 4
    return x, y


def train(net: Net, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> float:
    """Plain SGD epochs; the batch order comes from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return float(loss.detach())


def test(net: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = net(x)
        return float(nn.functional.cross_entropy(out, y)), float(
            (out.argmax(1) == y).float().mean()
        )
