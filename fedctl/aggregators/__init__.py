"""Aggregation of model updates: weighted mean, robust aggregators, server optimizers."""

from fedctl.aggregators.base import Aggregator
from fedctl.aggregators.buffered import BufferedAggregator, TooFewResults
from fedctl.aggregators.bulyan import BulyanAggregator
from fedctl.aggregators.krum import KrumAggregator, MultiKrumAggregator
from fedctl.aggregators.median import MedianAggregator
from fedctl.aggregators.select import is_incremental, make_aggregator, min_results, parse_aggregator
from fedctl.aggregators.server_opt import ServerOptimizer
from fedctl.aggregators.trimmed_mean import TrimmedMeanAggregator
from fedctl.aggregators.weighted import (
    MetricsMean,
    UpdateRejected,
    WeightedAggregator,
    check_update,
)

__all__ = [
    "Aggregator",
    "BufferedAggregator",
    "BulyanAggregator",
    "KrumAggregator",
    "MedianAggregator",
    "MetricsMean",
    "MultiKrumAggregator",
    "ServerOptimizer",
    "TooFewResults",
    "TrimmedMeanAggregator",
    "UpdateRejected",
    "WeightedAggregator",
    "check_update",
    "is_incremental",
    "make_aggregator",
    "min_results",
    "parse_aggregator",
]
