"""Privacy filters: transformations of what crosses a boundary, at four named points.

=================  ========================================================================
point              where it runs
=================  ========================================================================
``task_in``        on a site, on a task's model before the client script receives it
``result_out``     on a site, on the script's answer before it leaves the site
``result_in``      on the server, on a site's result before it is aggregated
``aggregate_out``  on the server, on a model before it is broadcast to the sites
=================  ========================================================================

A filter is named declaratively (``{"name": "clip_update", "max_norm": 1.0}``, arguments plain
JSON), from a fixed registry, never by class path. Filters work tensor by tensor: they take a
mapping of tensors and give back a mapping that computes each tensor when it is read, so a
model read lazily from a file keeps its memory bounds (``percentile_privacy`` and
``svt_privacy`` rank every value of the update and hold one float32 copy of it: documented).
Filters that act on the *update* (the result minus the model the task carried) get that model
through their context. Randomness comes from the context: reproducible in simulation (derived
from the run's seed), secret on real sites and servers.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedctl.codec.jsondata import check_json
from fedctl.codec.model import FLModel
from fedctl.errors import CodecError

if TYPE_CHECKING:
    pass

from fedctl.privacy.builtin import (
    ClipUpdate,
    ExcludeVars,
    GaussianNoise,
    PercentilePrivacy,
    Quantize,
    SVTPrivacy,
)
from fedctl.privacy.context import (
    POINTS,
    Filter,
    FilterContext,
    FilterError,
    FilterFailed,
)

__all__ = [
    "FILTERS",
    "POINTS",
    "Filter",
    "FilterChain",
    "FilterContext",
    "FilterError",
    "FilterFailed",
    "Placed",
    "parse_filter",
]

FILTERS: dict[str, type[Filter]] = {
    c.name: c
    for c in (ExcludeVars, ClipUpdate, GaussianNoise, PercentilePrivacy, SVTPrivacy, Quantize)
}


# ---------------------------------------------------------------------- specs and chains


@dataclass(frozen=True)
class Placed:
    """A filter and the point it runs at."""

    filter: Filter
    point: str

    def spec(self) -> dict[str, Any]:
        return {"name": self.filter.name, **self.filter.args(), "at": self.point}


def parse_filter(spec: Any, where: str = "filter") -> Placed:
    """A filter spec (``"name"`` or ``{"name": …, "at": point, **args}``) as a placed filter;
    FilterError with one line naming ``where`` and the problem."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise FilterError(f"{where}: a filter is a name or a mapping with a 'name'")
    try:
        check_json(dict(spec), where)
    except CodecError as exc:
        raise FilterError(str(exc)) from None
    args = dict(spec)
    name = args.pop("name", None)
    cls = FILTERS.get(name) if isinstance(name, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(name), FILTERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FilterError(
            f"{where}: unknown filter {name!r}{hint}; the filters are {', '.join(FILTERS)}"
        )
    point = args.pop("at", cls.default_point)
    if point not in cls.points:
        raise FilterError(f"{where}: {name} runs at {', '.join(cls.points)}, not at {point!r}")
    accepted = list(inspect.signature(cls.__init__).parameters)[1:]
    unknown = [a for a in args if a not in accepted]
    if unknown:
        raise FilterError(
            f"{where}: {name} has no argument {unknown[0]!r} (it takes {', '.join(accepted)})"
        )
    try:
        return Placed(cls(**args), point)
    except FilterError as exc:
        raise FilterError(f"{where}: {name}: {exc}") from None
    except TypeError as exc:  # a required argument missing
        raise FilterError(f"{where}: {name}: {exc}") from None


class FilterChain:
    """The filters of one job and/or one site, by point, in order."""

    def __init__(self, placed: list[Placed] | None = None) -> None:
        self.placed = list(placed or [])

    @classmethod
    def from_specs(cls, specs: Any, where: str = "privacy") -> FilterChain:
        """A chain from a list of specs (None: no filters)."""
        if specs is None:
            return cls()
        if not isinstance(specs, list):
            raise FilterError(f"{where} must be a list of filter specs")
        return cls([parse_filter(s, f"{where}[{i}]") for i, s in enumerate(specs)])

    def then(self, other: FilterChain) -> FilterChain:
        """This chain's filters, then ``other``'s (a site's own filters run last)."""
        return FilterChain(self.placed + other.placed)

    def at(self, point: str) -> list[Filter]:
        return [p.filter for p in self.placed if p.point == point]

    def names(self, point: str) -> list[str]:
        return [f.name for f in self.at(point)]

    def specs(self) -> list[dict[str, Any]]:
        return [p.spec() for p in self.placed]

    def __bool__(self) -> bool:
        return bool(self.placed)

    def apply(self, point: str, model: FLModel, ctx: FilterContext) -> FLModel:
        """``model`` through every filter at ``point``, in order (lazily, tensor by tensor)."""
        if model.params is None:
            return model
        for f in self.at(point):
            model = f.apply(model, ctx)
        return model

    def excluded_patterns(self) -> list[str]:
        """Every pattern an exclude_vars filter of this chain keeps from leaving a site."""
        return [
            p
            for placed in self.placed
            if isinstance(placed.filter, ExcludeVars) and placed.point == "result_out"
            for p in placed.filter.patterns
        ]
