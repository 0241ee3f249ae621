"""Data and local training shared by the benchmark's client script and its reference loop, so
both run the same model, data and mini-batches."""

import torch
from torch import nn

SIZES = {"small": (128, 10), "large": (1024, 1024)}


def shard(size: str, site_index: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's synthetic data, from its own generator (not the global one)."""
    features, classes = SIZES[size]
    g = torch.Generator().manual_seed(10_000 + site_index)
    x = torch.randn(samples, features, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)
    return x, y


def local_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float
) -> tuple[int, float]:
    """Plain SGD epochs; mini-batch order comes from torch's global generator."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    steps, loss = 0, torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
    return steps, float(loss.detach())
