"""The base of aggregators that need every update of a round at once (robust aggregation).

The weighted mean folds each update into a running sum and drops it (memory O(model)). A median,
a trimmed mean or Krum cannot: the answer depends on all updates together, so these keep every
accepted update of the round until :meth:`result` (memory O(N × model); ``nbytes`` says how much,
and ``bench/bench_aggregators.py`` measures it). They are meant for rounds of tens to hundreds of
sites, where some may be faulty or hostile, not for thousands of sites with a large model.

Updates are kept as full weights (a DIFF update ``d`` becomes ``g + d``), in float64 by default
(``precision="float32"`` halves the memory). Before combining, the updates are put in a canonical
order (by a hash of their values), so ties (e.g. two updates with the same Krum score) are broken
the same way whatever order the results arrived in: same seed, same model.

Aggregation weights are *ignored*: every accepted update has the same say, because a faulty site
could claim any weight (a weight of 0 still drops the update, as it does for the mean).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from fedctl.aggregators.weighted import PRECISIONS, UpdateRejected, check_update
from fedctl.codec.model import ParamsType
from fedctl.errors import RunFailed

if TYPE_CHECKING:
    import torch


class TooFewResults(RunFailed):
    """A robust aggregator got fewer results than its parameters need (e.g. Krum's n ≥ 2f+3)."""


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer ≥ minimum, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


class BufferedAggregator:
    """Keeps each update (as full weights) until :meth:`result` combines them.

    Subclasses set ``name`` and implement :meth:`combine`; they validate their parameters in
    :meth:`check_params`, which returns how many results a round needs.
    """

    name: ClassVar[str] = ""
    #: False: memory grows with the number of results (see the module docstring)
    incremental: ClassVar[bool] = False
    #: True when every update must carry the same parameter names (vector methods like Krum)
    same_keys: ClassVar[bool] = False

    def __init__(
        self, global_params: Mapping[str, torch.Tensor], precision: str = "float64", **params: Any
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.required = self.check_params(**params)
        self.params = params
        self.global_params = global_params
        self.precision = precision
        self.updates: list[dict[str, torch.Tensor]] = []
        self.digests: list[bytes] = []
        self.count = 0
        self.total_weight = 0.0

    @classmethod
    def check_params(cls, **params: Any) -> int:
        """Validate the parameters (ValueError with the reason); return the minimum results."""
        if params:
            raise ValueError(f"{cls.name} takes no parameter {sorted(params)[0]!r}")
        return 1

    def describe(self) -> str:
        """``name`` with its parameters, for messages (e.g. ``krum with f=2``)."""
        args = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        return f"{self.name} with {args}" if args else self.name

    def _dtype(self, t: torch.Tensor) -> torch.dtype:
        import torch

        if not t.is_floating_point():
            return t.dtype
        return torch.float64 if self.precision == "float64" else torch.float32

    def add(
        self,
        params: Mapping[str, torch.Tensor],
        weight: float,
        params_type: ParamsType | None = ParamsType.FULL,
        *,
        validate: bool = True,
    ) -> None:
        """Keep one site's update (as full weights); rejects it whole if invalid."""
        if validate:
            check_update(self.global_params, params, weight)
        if self.same_keys and self.updates and set(params) != set(self.updates[0]):
            missing = sorted(set(self.updates[0]) ^ set(params))
            raise UpdateRejected(
                f"{self.name} needs every update to carry the same parameters; this one differs "
                f"in {missing[0]!r}"
            )
        self.count += 1
        self.total_weight += weight
        if weight == 0:
            return
        diff = params_type == ParamsType.DIFF
        kept: dict[str, torch.Tensor] = {}
        for name, t in params.items():
            dt = self._dtype(t)
            if diff:
                kept[name] = self.global_params[name].to(dt, copy=True).add_(t.to(dt))
            else:
                kept[name] = t.to(dt, copy=True)  # never keep a view of the sender's tensor
        self._store(kept)

    def _keep(self, update: dict[str, torch.Tensor]) -> None:
        self.updates.append(update)

    def _store(self, update: dict[str, torch.Tensor]) -> None:
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(update):
            h.update(name.encode())
            h.update(update[name].contiguous().view(-1).numpy().view("uint8").data)
        self.digests.append(h.digest())
        self._keep(update)

    def canonical_order(self) -> list[int]:
        """Indices of the kept updates sorted by their digests (arrival order does not matter)."""
        return sorted(range(len(self.updates)), key=lambda i: self.digests[i])

    def _reorder(self, order: list[int]) -> None:
        self.updates = [self.updates[i] for i in order]
        self.digests = [self.digests[i] for i in order]

    @property
    def nbytes(self) -> int:
        """Bytes of updates held now (what grows with the number of results)."""
        return sum(t.numel() * t.element_size() for u in self.updates for t in u.values())

    def result(self) -> dict[str, torch.Tensor]:
        """The aggregate (same names, shapes and dtypes as the global model); call once."""
        n = len(self.updates)
        if n < self.required:
            raise TooFewResults(
                f"aggregator {self.describe()} needs at least {self.required} results, got {n}"
            )
        if n == 0:
            return dict(self.global_params)
        self._reorder(self.canonical_order())
        combined = self.combine()
        out: dict[str, torch.Tensor] = {}
        for name, g in self.global_params.items():
            t = combined.get(name)
            if t is None:
                out[name] = g
                continue
            if not g.is_floating_point():
                t = t.round()
            out[name] = t.to(g.dtype)
        self.updates, self.digests = [], []
        return out

    def stack(self, name: str, which: list[int] | None = None) -> torch.Tensor | None:
        """The updates' values of one parameter stacked on a new first axis (float64 for
        integer tensors); None when no update carries it."""
        import torch

        keep = set(range(len(self.updates))) if which is None else set(which)
        rows = [u[name] for i, u in enumerate(self.updates) if i in keep and name in u]
        if not rows:
            return None
        s = torch.stack(rows)
        return s if s.is_floating_point() else s.to(torch.float64)

    def combine(self) -> dict[str, torch.Tensor]:
        """Name → aggregated tensor for every name some update carries."""
        raise NotImplementedError


class CoordinateAggregator(BufferedAggregator):
    """Aggregates each coordinate independently: per parameter, over the updates carrying it
    (so partial updates work), with :meth:`reduce` applied to the stacked values."""

    def combine(self) -> dict[str, torch.Tensor]:
        names = {name for u in self.updates for name in u}
        out = {}
        for name in self.global_params:
            if name not in names:
                continue
            s = self.stack(name)
            assert s is not None
            if s.shape[0] < self.required:
                raise TooFewResults(
                    f"aggregator {self.describe()} needs at least {self.required} results, "
                    f"got {s.shape[0]} for parameter {name!r}"
                )
            out[name] = self.reduce(s)
        return out

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Aggregate values stacked on axis 0 (one row per update)."""
        raise NotImplementedError
