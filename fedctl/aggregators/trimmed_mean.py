"""Coordinate-wise trimmed mean of the updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML 2018). For each coordinate, the ``k`` largest and ``k`` smallest values
over the round's updates are dropped and the rest averaged; up to ``k`` faulty sites per side
cannot pull the result outside the honest values.

Parameters (exactly one)
------------------------
beta:  fraction trimmed from each side, 0 ≤ beta < 0.5: ``k = floor(beta · n)`` for n results
       (SciPy's ``trim_mean`` convention). A round needs at least ``ceil(1 / beta)`` results so
       that something is trimmed at all; fewer fails with a one-line error naming both numbers.
f:     trim exactly ``f`` values from each side; a round needs at least ``2f + 1`` results.

Not incremental: keeps every update of the round (memory O(N × model)); weights are ignored.
Selected with ``{"name": "trimmed_mean", "beta": 0.1}`` or ``{"name": "trimmed_mean", "f": 1}``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.buffered import CoordinateAggregator, check_int

if TYPE_CHECKING:
    import torch


def trimmed_mean(stacked: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over axis 0 of ``stacked`` after dropping its ``k`` smallest and ``k`` largest values
    per coordinate (needs more than ``2k`` rows)."""
    n = stacked.shape[0]
    if n <= 2 * k:
        raise ValueError(f"cannot trim {k} values from each side of {n}")
    return stacked.sort(dim=0).values[k : n - k].mean(dim=0)


class TrimmedMeanAggregator(CoordinateAggregator):
    """Coordinate-wise trimmed mean; see the module docstring."""

    name = "trimmed_mean"

    @classmethod
    def check_params(cls, beta: Any = None, f: Any = None, **extra: Any) -> int:
        super().check_params(**extra)
        if (beta is None) == (f is None):
            raise ValueError("trimmed_mean takes exactly one of beta (a fraction) or f (a count)")
        if f is not None:
            return 2 * check_int("trimmed_mean f", f, 0) + 1
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean beta must be a number in [0, 0.5), got {beta!r}")
        if beta == 0:
            return 1
        n = max(1, math.ceil(1 / beta))  # the smallest n with int(beta * n) ≥ 1, exactly
        while int(beta * n) < 1:
            n += 1
        while n > 1 and int(beta * (n - 1)) >= 1:
            n -= 1
        return n

    def trim_count(self, n: int) -> int:
        """How many values are dropped from each side out of ``n``."""
        f = self.params.get("f")
        if f is not None:
            return int(f)
        return int(float(self.params["beta"]) * n)

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(stacked, self.trim_count(stacked.shape[0]))
