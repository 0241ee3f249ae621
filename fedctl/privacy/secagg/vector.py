"""A model update as the one vector secure aggregation sums, and back.

A site turns its training result into ``[w·x/B..., w]`` (:func:`~.quantize.pack_weighted`):
``x`` is its update (the result's params minus the model its task carried, or the params of a
DIFF result) over the global model's floating-point entries, in a fixed order, bounded by the
clipping rule; ``w`` its weight in ``[0, 1]``. The server unmasks only the sum over the
survivors, ``[Σw·x/B..., Σw]``, and :meth:`InputSpec.mean_update` turns it into the mean update
per entry. Entries that are not floating point (e.g. BatchNorm's ``num_batches_tracked``) are
not aggregated: they keep the global model's value.

Clipping, without distributed DP: every coordinate of ``x`` is clamped to ``[-clip, clip]``
(updates are usually far inside; the site's log counts the coordinates that were not).
With distributed DP: ``x`` is clipped to L2 norm ``clip`` and each site adds Gaussian noise of
standard deviation ``noise_std`` per coordinate; the packing bound is then ``clip + 8·noise_std``
(a noisy coordinate beyond it, probability below 1e-15, is clamped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import NUM_STEPS_KEY, FLModel, ParamsType
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.quantize import pack_weighted

if TYPE_CHECKING:
    import torch

#: a noisy coordinate is clamped beyond this many standard deviations past the clip
NOISE_MARGIN = 8.0


def _number(name: str, value: Any, *, zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise SecAggConfigError(f"{name} must be a finite number {'≥' if zero else '>'} 0")
    return float(value)


@dataclass(frozen=True)
class InputSpec:
    """How a site builds its input for one round (sent with the round's training task).

    ``keys`` and ``sizes``: the global model's floating-point entries, in order, and their
    element counts. ``clip``: the coordinate bound (``l2`` False) or the L2 norm bound (``l2``
    True, distributed DP). ``noise_std``: the Gaussian noise each site adds per coordinate.
    ``max_weight``: a site's weight is its ``NUM_STEPS_CURRENT_ROUND`` divided by this (capped
    at 1); None: every site weighs the same.
    """

    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    clip: float
    l2: bool = False
    noise_std: float = 0.0
    max_weight: float | None = None

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.sizes) or not self.keys:
            raise SecAggConfigError("secure aggregation needs at least one floating-point entry")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.sizes):
            raise SecAggConfigError("entry sizes must be positive integers")
        _number("clip", self.clip)
        _number("noise_std", self.noise_std, zero=True)
        if self.max_weight is not None:
            _number("max_weight", self.max_weight)
        if not isinstance(self.l2, bool):
            raise SecAggConfigError("l2 must be true or false")

    @classmethod
    def for_model(
        cls, params: Mapping[str, torch.Tensor], clip: float, **options: Any
    ) -> InputSpec:
        """The spec over ``params``' floating-point entries."""
        keys = tuple(k for k, t in params.items() if t.is_floating_point() and t.numel())
        return cls(keys, tuple(int(params[k].numel()) for k in keys), clip, **options)

    @property
    def length(self) -> int:
        """Values in a site's input: the entries' elements and the weight."""
        return sum(self.sizes) + 1

    @property
    def bound(self) -> float:
        """The packing bound B of the update's coordinates."""
        return self.clip + NOISE_MARGIN * self.noise_std

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out["keys"], out["sizes"] = list(self.keys), list(self.sizes)
        return out

    @classmethod
    def from_public(cls, data: Any) -> InputSpec:
        """The spec a task carried (refused, one line, if it is not one)."""
        if not isinstance(data, Mapping) or set(data) != set(cls.__dataclass_fields__):
            raise SecAggError("the task's secure-aggregation input spec is malformed")
        keys, sizes = data["keys"], data["sizes"]
        if not (isinstance(keys, list) and isinstance(sizes, list)):
            raise SecAggError("the task's secure-aggregation input spec is malformed")
        if not all(isinstance(k, str) for k in keys):
            raise SecAggError("the task's secure-aggregation input spec is malformed")
        try:
            return cls(**{**data, "keys": tuple(keys), "sizes": tuple(sizes)})
        except (SecAggConfigError, TypeError) as exc:
            raise SecAggError(f"the task's secure-aggregation input spec: {exc}") from None

    # ------------------------------------------------------------------ site side

    def weight_of(self, model: FLModel) -> float:
        """The site's weight in [0, 1] (see the class docstring)."""
        if self.max_weight is None:
            return 1.0
        value = (model.meta or {}).get(NUM_STEPS_KEY, 1)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SecAggError(f"meta[{NUM_STEPS_KEY!r}] must be a number, got {value!r:.40}")
        if not math.isfinite(value) or value < 0:
            raise SecAggError(f"meta[{NUM_STEPS_KEY!r}] must be a finite number ≥ 0")
        return min(float(value) / self.max_weight, 1.0)

    def site_input(
        self,
        model: FLModel,
        base: Mapping[str, torch.Tensor] | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A site's float64 input vector from its result ``model`` (the task carried
        ``base``), and what was done to it (for the site's log)."""
        import torch

        params = model.params or {}
        diff = model.params_type == ParamsType.DIFF
        parts = []
        for key, size in zip(self.keys, self.sizes, strict=True):
            if key not in params:
                raise SecAggError(f"the result has no {key!r}, which the global model has")
            t = params[key]
            if not isinstance(t, torch.Tensor) or t.numel() != size:
                raise SecAggError(f"the result's {key!r} does not have the global model's size")
            u = t.detach().reshape(-1).to(torch.float64)
            if not diff:
                if base is None or key not in base:
                    raise SecAggError(f"no model to take {key!r}'s update against")
                u = u - base[key].detach().reshape(-1).to(torch.float64)
            parts.append(u)
        x = torch.cat(parts)
        if not bool(torch.isfinite(x).all()):
            raise SecAggError("the update contains NaN or infinity")
        notes: dict[str, Any] = {}
        if self.l2:
            norm = float(x.norm())
            notes["norm"] = norm
            if norm > self.clip:
                x.mul_(self.clip / norm)
        else:
            notes["clipped"] = int((x.abs() > self.clip).sum())
            x.clamp_(-self.clip, self.clip)
        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            x.add_(noise, alpha=self.noise_std)
            x.clamp_(-self.bound, self.bound)
        return pack_weighted(x, self.weight_of(model), self.bound), notes

    # ------------------------------------------------------------------ server side

    def mean_update(
        self, total: torch.Tensor, shapes: Mapping[str, torch.Size], denominator: float | None
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The unmasked sum → (the mean update per entry, float64 in ``shapes``, and Σw).
        ``denominator`` replaces Σw (DP-FedAvg's fixed one); Σw = 0 is refused."""
        import torch

        if total.dim() != 1 or total.numel() != self.length:
            raise SecAggError(f"the sum has {total.numel()} values, not {self.length}")
        weights = float(total[-1])
        divide = denominator if denominator is not None else weights
        if not divide > 0:
            raise SecAggError("the survivors' weights sum to 0: no update to average")
        flat = total[:-1].to(torch.float64) * (self.bound / divide)
        out, start = {}, 0
        for key, size in zip(self.keys, self.sizes, strict=True):
            out[key] = flat[start : start + size].reshape(shapes[key])
            start += size
        return out, weights
