"""Privacy: filters at the boundaries a model crosses, central differential privacy with an
accountant, and the site privacy policies that enforce them (docs/privacy.md)."""

from fedctl.privacy.dp import CentralDP, DPAggregator, DPError, epsilon
from fedctl.privacy.filters import (
    FILTERS,
    POINTS,
    Filter,
    FilterChain,
    FilterContext,
    FilterError,
    parse_filter,
)

__all__ = [
    "FILTERS",
    "POINTS",
    "CentralDP",
    "DPAggregator",
    "DPError",
    "Filter",
    "FilterChain",
    "FilterContext",
    "FilterError",
    "epsilon",
    "parse_filter",
]
