"""Data and local training, shared by the client script and the framework-free reference loop.

Plain PyTorch: a site's data and each round's mini-batch order come from explicit generators
seeded by (site, round), so the reference reproduces them without any fedctl code.
"""

import torch
from torch import nn

BATCH = 8
LR = 0.1


def shard(site_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Site ``site_index``'s data; sites hold different amounts (so FedAvg weights differ)."""
    g = torch.Generator().manual_seed(1_000 + site_index)
    n = 24 + 8 * (site_index % 4)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    site_index: int,
    rnd: int,
    *,
    global_rng: bool = False,
) -> int:
    """One epoch of plain SGD; returns the number of steps (the FedAvg weight)."""
    if global_rng:
        order = torch.randperm(len(x))  # the global generator, which fedctl seeds per task
    else:
        g = torch.Generator().manual_seed(77 * rnd + site_index)
        order = torch.randperm(len(x), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    for i in range(0, len(order), BATCH):
        idx = order[i : i + BATCH]
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        steps += 1
    return steps
