"""What every aggregator offers a workflow: fold one round's updates in, give the aggregate.

The weighted mean (:class:`~fedctl.aggregators.weighted.WeightedAggregator`) keeps O(model)
memory; the robust ones (:class:`~fedctl.aggregators.buffered.BufferedAggregator` and its
subclasses) keep every update of the round. A workflow gets a fresh one per round from
:func:`~fedctl.aggregators.select.make_aggregator` and only uses this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from fedctl.codec.model import ParamsType


class Aggregator(Protocol):
    """One round's aggregation of site updates."""

    #: updates folded in so far, and the sum of their weights
    count: int
    total_weight: float

    def add(
        self,
        params: Mapping[str, torch.Tensor],
        weight: float,
        params_type: ParamsType | None = ...,
        *,
        validate: bool = True,
    ) -> None:
        """Fold one site's update in (FULL weights or a DIFF), or reject it whole."""
        ...

    def result(self) -> dict[str, torch.Tensor]:
        """The aggregate: the new global parameters (call once per round)."""
        ...
