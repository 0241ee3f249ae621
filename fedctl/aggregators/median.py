"""Coordinate-wise median of the updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML 2018). Each coordinate of the new model is the median of that
coordinate over the round's updates; fewer than half of the sites being faulty cannot move it
outside the range of the honest values. With an even number of updates the median is the mean of
the two middle values (NumPy's convention).

Parameters
----------
f:  faulty sites to tolerate (optional, default 0). A round then needs at least ``2f + 1``
    results, and fails with a one-line error naming both numbers when it has fewer.

Not incremental: keeps every update of the round (memory O(N × model)); weights are ignored.
Selected with ``aggregator="median"`` or ``{"name": "median", "f": 1}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedctl.aggregators.buffered import CoordinateAggregator, check_int

if TYPE_CHECKING:
    import torch


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over axis 0 of ``stacked`` (one row per update), averaging the two middle values
    when the count is even."""
    n = stacked.shape[0]
    s = stacked.sort(dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


class MedianAggregator(CoordinateAggregator):
    """Coordinate-wise median; see the module docstring."""

    name = "median"

    @classmethod
    def check_params(cls, f: Any = 0, **extra: Any) -> int:
        super().check_params(**extra)
        return 2 * check_int("median f", f, 0) + 1

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return coordinate_median(stacked)
