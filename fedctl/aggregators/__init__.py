"""Aggregation of model updates: weighted mean, robust aggregators, server optimizers."""

from fedctl.aggregators.weighted import (
    MetricsMean,
    UpdateRejected,
    WeightedAggregator,
    check_update,
)

__all__ = ["MetricsMean", "UpdateRejected", "WeightedAggregator", "check_update"]
