"""Synthetic non-IID classification data: every site draws its own shard from its index.

One task is shared by all sites: ``classes`` classes in ``features`` dimensions, each class a
mixture of ``modes`` Gaussian blobs whose centres are fixed by ``task_seed`` (so a linear model
is not enough). Each site then draws its own shard, from a generator seeded by
``(task_seed, site_index)``, with three independent kinds of skew:

* **label skew** — the site's class proportions ``q ~ Dirichlet(alpha · 1)``. Small ``alpha``
  (0.1) gives sites that see one or two classes; ``alpha=None`` gives uniform labels (IID).
* **quantity skew** — the site's sample count is ``samples · LogNormal(0, quantity_skew)``
  (at least ``min_samples``), so sites do different amounts of local work per epoch.
* **feature skew** — the site's inputs are ``x · (1 + feature_skew·a) + feature_skew·b`` with a
  per-site random scale ``a`` and shift ``b`` per feature (different scanners or sensors).

Validation data follows the site's own distribution; :func:`test_set` is a balanced sample of
the task without any site's feature skew (what a server-side evaluation uses). Generating a
shard takes milliseconds, so per-round scripts can regenerate it every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Shard:
    """One site's data."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    #: the site's class proportions
    label_dist: list[float]

    @property
    def num_train(self) -> int:
        return len(self.y_train)


def _centres(task_seed: int, classes: int, features: int, modes: int, spread: float) -> Any:
    import numpy as np

    rng = np.random.default_rng([task_seed, 0x7A5C])
    return rng.normal(0.0, spread, size=(classes, modes, features))


def _draw(rng: Any, centres: Any, labels: Any, noise: float) -> Any:
    import numpy as np

    modes = centres.shape[1]
    which = rng.integers(0, modes, size=len(labels))
    x = centres[labels, which] + rng.normal(0.0, noise, size=(len(labels), centres.shape[2]))
    return x.astype(np.float32)


def make_shard(
    site_index: int,
    num_sites: int,
    *,
    alpha: float | None = 0.5,
    samples: int = 400,
    quantity_skew: float = 0.0,
    feature_skew: float = 0.0,
    val_samples: int | None = None,
    min_samples: int = 32,
    task_seed: int = 0,
    classes: int = 10,
    features: int = 32,
    modes: int = 2,
    spread: float = 1.0,
    noise: float = 1.0,
) -> Shard:
    """Site ``site_index``'s shard (see the module docstring for the parameters)."""
    import numpy as np
    import torch

    if not 0 <= site_index < max(num_sites, 1):
        raise ValueError(f"site_index {site_index} is outside 0..{num_sites - 1}")
    rng = np.random.default_rng([task_seed, 1 + site_index])
    if alpha is None:
        q = np.full(classes, 1.0 / classes)
    else:
        q = rng.dirichlet(np.full(classes, float(alpha)))
    n = samples
    if quantity_skew > 0:
        n = round(float(samples * rng.lognormal(0.0, quantity_skew)))
    n = max(min_samples, n)
    n_val = val_samples if val_samples is not None else max(16, samples // 4)
    centres = _centres(task_seed, classes, features, modes, spread)
    scale = 1.0 + feature_skew * rng.normal(size=features)
    shift = feature_skew * rng.normal(size=features)

    def draw(count: int) -> tuple[Any, Any]:
        y = rng.choice(classes, size=count, p=q)
        x = _draw(rng, centres, y, noise) * scale.astype(np.float32) + shift.astype(np.float32)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    x_train, y_train = draw(n)
    x_val, y_val = draw(n_val)
    return Shard(x_train, y_train, x_val, y_val, [float(v) for v in q])


def test_set(
    n: int = 2000,
    *,
    task_seed: int = 0,
    classes: int = 10,
    features: int = 32,
    modes: int = 2,
    spread: float = 1.0,
    noise: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced sample of the task, without feature skew: ``(x, y)``."""
    import numpy as np
    import torch

    rng = np.random.default_rng([task_seed, 0])
    y = np.arange(n) % classes
    x = _draw(rng, _centres(task_seed, classes, features, modes, spread), y, noise)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
