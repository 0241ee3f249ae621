"""Bulyan: Krum selection followed by a coordinate-wise trimmed mean around the median.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium"
(ICML 2018). With ``n`` updates and up to ``f`` hostile ones:

1. select ``θ = n - 2f`` updates by applying Krum repeatedly (each time to the updates not yet
   selected, removing the one it picks);
2. for each coordinate, average the ``β = θ - 2f`` selected values closest to their median.

Step 1 removes updates that are far away as a whole; step 2 removes values that are extreme in
any single coordinate, which Krum alone lets through.

Parameters
----------
f:  faulty sites to tolerate. A round needs ``n ≥ 4f + 3`` results; fewer fails the round with a
    one-line error naming both numbers.

Not incremental: keeps every update of the round (memory O(N × model)) and their N × N
distances; weights are ignored. Selected with ``{"name": "bulyan", "f": 1}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.aggregators.buffered import BufferedAggregator, check_int
from fedctl.aggregators.krum import DistanceAggregator, krum_select
from fedctl.aggregators.median import coordinate_median

if TYPE_CHECKING:
    import torch


def bulyan_select(dist: torch.Tensor, f: int) -> list[int]:
    """Indices (sorted) of the ``n - 2f`` updates chosen by repeated Krum on ``dist``."""
    remaining = list(range(dist.shape[0]))
    chosen: list[int] = []
    for _ in range(dist.shape[0] - 2 * f):
        sub = dist[remaining][:, remaining]
        pick = remaining[krum_select(sub, f, 1)[0]]
        chosen.append(pick)
        remaining.remove(pick)
    return sorted(chosen)


def closest_to_median_mean(stacked: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values (rows) closest to the median."""
    import torch

    med = coordinate_median(stacked)
    order = (stacked - med).abs().argsort(dim=0, stable=True)[:beta]
    return torch.gather(stacked, 0, order).mean(dim=0)


class BulyanAggregator(DistanceAggregator):
    """Bulyan; see the module docstring."""

    name = "bulyan"

    @classmethod
    def check_params(cls, f: Any = None, **extra: Any) -> int:
        BufferedAggregator.check_params(**extra)
        if f is None:
            raise ValueError("bulyan needs f, the number of faulty sites to tolerate")
        return 4 * check_int("bulyan f", f, 0) + 3

    def combine(self) -> dict[str, torch.Tensor]:
        f = int(self.params["f"])
        chosen = bulyan_select(self.distances(), f)
        beta = len(chosen) - 2 * f
        out = {}
        for name in self.updates[0]:
            s = self.stack(name, chosen)
            assert s is not None
            out[name] = closest_to_median_mean(s, beta)
        return out
