"""Synthetic, learnable data: every site draws its own shard, nothing is downloaded.

All sites share one task (10 Gaussian classes in 32 dimensions, class centres fixed by
``TASK_SEED``); each site's samples come from its own generator, seeded by its index.
"""

import torch

TASK_SEED = 1234
FEATURES, CLASSES = 32, 10


def _centres() -> torch.Tensor:
    g = torch.Generator().manual_seed(TASK_SEED)
    return torch.randn(CLASSES, FEATURES, generator=g) * 0.6


def make_shard(site_index: int, num_sites: int, n_train: int = 512, n_val: int = 256):
    """((x_train, y_train), (x_val, y_val)) for one site."""
    g = torch.Generator().manual_seed(TASK_SEED + 1 + site_index)
    centres = _centres()

    def draw(n: int):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        x = centres[y] + torch.randn(n, FEATURES, generator=g)
        return x, y

    return draw(n_train), draw(n_val)
