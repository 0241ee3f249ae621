"""Choosing a round's aggregator from a declarative spec (what recipes and job folders hold).

A spec is a name or a dict with a ``name`` and the aggregator's parameters::

    None or "mean"                          weighted mean (incremental, the default)
    "median" / {"name": "median", "f": 1}   coordinate-wise median
    {"name": "trimmed_mean", "beta": 0.1}   coordinate-wise trimmed mean (or "f": k)
    {"name": "krum", "f": 1}                Krum
    {"name": "multi_krum", "f": 1, "m": 4}  Multi-Krum
    {"name": "bulyan", "f": 1}              Bulyan
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedctl.aggregators.buffered import BufferedAggregator
from fedctl.aggregators.bulyan import BulyanAggregator
from fedctl.aggregators.krum import KrumAggregator, MultiKrumAggregator
from fedctl.aggregators.median import MedianAggregator
from fedctl.aggregators.trimmed_mean import TrimmedMeanAggregator
from fedctl.aggregators.weighted import WeightedAggregator

if TYPE_CHECKING:
    import torch

    from fedctl.aggregators.base import Aggregator

MEAN = "mean"
ROBUST: dict[str, type[BufferedAggregator]] = {
    cls.name: cls
    for cls in (
        MedianAggregator,
        TrimmedMeanAggregator,
        KrumAggregator,
        MultiKrumAggregator,
        BulyanAggregator,
    )
}
NAMES = (MEAN, *ROBUST)


def parse_aggregator(spec: Any) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of a spec; ValueError with a one-line reason if it is not valid."""
    if spec is None:
        return MEAN, {}
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(
                f"aggregator spec {dict(spec)!r} needs a 'name' (one of {list(NAMES)})"
            )
    else:
        raise ValueError(
            f"aggregator must be a name or a dict with a 'name', got {type(spec).__name__}"
        )
    if name == MEAN:
        if params:
            raise ValueError(f"aggregator mean takes no parameter {sorted(params)[0]!r}")
        return name, params
    cls = ROBUST.get(name)
    if cls is None:
        raise ValueError(f"unknown aggregator {name!r} (one of {', '.join(NAMES)})")
    cls.check_params(**params)
    return name, params


def aggregator_label(spec: Any) -> str:
    """A short description of a spec for messages, e.g. ``krum with f=2``."""
    name, params = parse_aggregator(spec)
    args = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{name} with {args}" if args else name


def min_results(spec: Any) -> int:
    """The fewest results a round needs with this aggregator (after validating the spec)."""
    name, params = parse_aggregator(spec)
    return 1 if name == MEAN else ROBUST[name].check_params(**params)


def is_incremental(spec: Any) -> bool:
    """True when the aggregator keeps O(model) memory whatever the number of results."""
    return parse_aggregator(spec)[0] == MEAN


def make_aggregator(
    spec: Any, global_params: Mapping[str, torch.Tensor], precision: str = "float64"
) -> Aggregator:
    """A fresh aggregator for one round."""
    name, params = parse_aggregator(spec)
    if name == MEAN:
        return WeightedAggregator(global_params, precision)
    return ROBUST[name](global_params, precision, **params)
