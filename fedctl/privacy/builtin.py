"""The built-in privacy filters (see :mod:`fedctl.privacy.filters` for the points and specs).

Each works tensor by tensor where it can (``exclude_vars``, ``clip_update``,
``gaussian_noise``, ``quantize``); ``percentile_privacy`` and ``svt_privacy`` rank every value of
the update and hold one float32 copy of it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedctl.codec.model import NUM_STEPS_KEY, FLModel, LazyMap, ParamsType

if TYPE_CHECKING:
    import torch

from fedctl.privacy.context import (
    Filter,
    FilterContext,
    FilterError,
    Params,
    _floats,
    _number,
    update_of,
    with_update,
)


class ExcludeVars(Filter):
    """Parameters whose names match a pattern never cross this point (fnmatch patterns)."""

    name = "exclude_vars"
    points = ("task_in", "result_out", "result_in")
    summary = "parameters matching the patterns never leave (or are never taken)"

    def __init__(self, patterns: list[str]) -> None:
        if (
            not isinstance(patterns, list)
            or not patterns
            or not all(isinstance(p, str) and p for p in patterns)
        ):
            raise FilterError("patterns must be a non-empty list of name patterns")
        self.patterns = list(patterns)

    def matches(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.patterns)

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        params = model.params or {}
        keep = [k for k in params if not self.matches(k)]
        dropped = len(params) - len(keep)
        if dropped:
            ctx.note(self.name, excluded=dropped)
        return replace(model, params=LazyMap(keep, params.__getitem__))


def _update_norm(update: Params) -> float:
    """L2 norm of every float value of an update, one tensor at a time (float64 sum)."""
    total = 0.0
    for t in update.values():
        if _floats(t):
            total += float(t.double().pow(2).sum())
    return math.sqrt(total)


class ClipUpdate(Filter):
    """Scale the update so that its L2 norm (over every parameter) is at most ``max_norm``."""

    name = "clip_update"
    points = ("result_out", "result_in")
    summary = "the update's L2 norm is scaled down to at most max_norm"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _number("max_norm", max_norm, low=0.0, open_low=True)

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        update = update_of(model, ctx, self.name)
        norm = _update_norm(update)
        ctx.note(self.name, norm=round(norm, 6), clipped=norm > self.max_norm)
        if norm <= self.max_norm:
            return model
        scale = self.max_norm / norm
        return with_update(
            model, ctx, lambda k: update[k] * scale if _floats(update[k]) else update[k]
        )


class GaussianNoise(Filter):
    """Add i.i.d. N(0, sigma²) noise to every floating-point value."""

    name = "gaussian_noise"
    points = ("result_out", "result_in", "aggregate_out")
    summary = "adds N(0, sigma²) to every value (of the update, or of the broadcast model)"

    def __init__(self, sigma: float) -> None:
        self.sigma = _number("sigma", sigma, low=0.0)

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        import torch

        params = model.params or {}
        if self.sigma == 0:
            return model
        ctx.note(self.name, sigma=self.sigma)

        def noisy(k: str) -> Any:
            t = params[k]
            if not _floats(t):
                return t
            noise = torch.randn(t.shape, generator=ctx.generator(self.name, k), dtype=torch.float64)
            return (t.double() + noise * self.sigma).to(t.dtype)

        # x + n for a FULL result is (x - g) + n added back to g: the noise lands on the update
        return replace(model, params=LazyMap(list(params), noisy))


def _steps(model: FLModel) -> float:
    value = (model.meta or {}).get(NUM_STEPS_KEY, 1)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok and math.isfinite(value) else 1.0


def _flat_update(update: Params) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """Every float value of the update in one float32 vector, with where each tensor lies."""
    import torch

    parts, spans, pos = [], [], 0
    for k in sorted(update):
        t = update[k]
        if _floats(t) and t.dim() > 0:
            flat = t.detach().reshape(-1).to(torch.float32)
            parts.append(flat)
            spans.append((k, pos, pos + flat.numel()))
            pos += flat.numel()
    return (torch.cat(parts) if parts else torch.zeros(0)), spans


def _unflatten(update: Params, flat: torch.Tensor, spans: list[tuple[str, int, int]]) -> Params:
    where = {k: (a, b) for k, a, b in spans}

    def value(k: str) -> Any:
        t = update[k]
        if k not in where:
            return t
        a, b = where[k]
        return flat[a:b].reshape(t.shape).to(t.dtype)

    return LazyMap(list(update), value)


class PercentilePrivacy(Filter):
    """Share only the largest update values (Shokri & Shmatikov, CCS 2015).

    The update is divided by the local steps; values whose magnitude is below the
    ``percentile``-th percentile of all magnitudes become 0, the rest are clipped to
    [-gamma, gamma]; the result is multiplied by the local steps again. Ranks every value of the
    update: holds one float32 copy of it.
    """

    name = "percentile_privacy"
    points = ("result_out",)
    summary = "only the largest update values are shared, clipped to gamma (Shokri & Shmatikov)"

    def __init__(self, percentile: float = 10, gamma: float = 0.01) -> None:
        self.percentile = _number("percentile", percentile, low=0.0, high=100.0)
        self.gamma = _number("gamma", gamma, low=0.0, open_low=True)

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        import torch

        update = update_of(model, ctx, self.name)
        steps = _steps(model)
        flat, spans = _flat_update(update)
        if flat.numel() == 0:
            return model
        per_step = flat / steps
        magnitude = per_step.abs()
        k = max(1, min(flat.numel(), math.ceil(flat.numel() * self.percentile / 100)))
        cutoff = float(torch.kthvalue(magnitude, k).values) if self.percentile > 0 else -1.0
        kept = magnitude > cutoff  # everything when percentile is 0
        shared = torch.where(kept, per_step.clamp(-self.gamma, self.gamma), 0.0) * steps
        ctx.note(self.name, cutoff=cutoff, shared=int(kept.sum()), total=flat.numel())
        new = _unflatten(update, shared, spans)
        return with_update(model, ctx, new.__getitem__)


class SVTPrivacy(Filter):
    """Differential privacy by the sparse vector technique, as NVIDIA FLARE offers it.

    A ``fraction`` of the update values (divided by the local steps and clipped to ``gamma``)
    is chosen by comparing each, with Laplace noise, to a noisy threshold ``tau`` (budget
    ``epsilon`` for the threshold, ``epsilon·(2c)^(2/3)`` for the comparisons); the chosen
    values are released with Laplace noise of budget ``noise_var`` and clipped to ``gamma``,
    every other value is 0. Ranks every value of the update: holds one float32 copy of it.
    """

    name = "svt_privacy"
    points = ("result_out",)
    summary = "sparse vector technique: a fraction of noisy update values above a threshold"

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 0.1,
        noise_var: float = 0.1,
        gamma: float = 1e-5,
        tau: float = 1e-6,
    ) -> None:
        self.fraction = _number("fraction", fraction, low=0.0, high=1.0, open_low=True)
        self.epsilon = _number("epsilon", epsilon, low=0.0, open_low=True)
        self.noise_var = _number("noise_var", noise_var, low=0.0, open_low=True)
        self.gamma = _number("gamma", gamma, low=0.0, open_low=True)
        self.tau = _number("tau", tau, low=0.0)

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        import torch

        update = update_of(model, ctx, self.name)
        steps = _steps(model)
        flat, spans = _flat_update(update)
        n = flat.numel()
        if n == 0:
            return model
        per_step = flat / steps
        count = min(n, math.ceil(n * self.fraction))
        g = ctx.generator(self.name)

        def laplace(scale: float, size: int) -> torch.Tensor:
            u = torch.rand(size, generator=g, dtype=torch.float64) - 0.5
            return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())

        threshold = self.tau + float(laplace(2 * self.gamma / self.epsilon, 1))
        eps_queries = self.epsilon * (2.0 * count) ** (2.0 / 3.0)
        query_scale = 4.0 * count * self.gamma / eps_queries
        magnitude = per_step.clamp(-self.gamma, self.gamma).abs().double()
        order = torch.randperm(n, generator=g)
        chosen: list[torch.Tensor] = []
        remaining = order
        while sum(c.numel() for c in chosen) < count and remaining.numel():
            above = magnitude[remaining] + laplace(query_scale, remaining.numel()) >= threshold
            chosen.append(remaining[above])
            remaining = remaining[~above]
        picked = torch.cat(chosen)[:count] if chosen else torch.zeros(0, dtype=torch.long)
        answers = per_step[picked].double() + laplace(
            2 * self.gamma / self.noise_var, picked.numel()
        )
        out = torch.zeros_like(per_step)
        out[picked] = answers.clamp(-self.gamma, self.gamma).to(out.dtype)
        ctx.note(self.name, shared=int(picked.numel()), total=n)
        new = _unflatten(update, out * steps, spans)
        return with_update(model, ctx, new.__getitem__)


class Quantize(Filter):
    """Round each tensor of the update to ``bits`` bits (affine, per tensor) and back: the
    hook for compressed updates; what crosses the point is what a compressed wire would
    carry."""

    name = "quantize"
    points = ("result_out", "aggregate_out")
    summary = "each tensor of the update rounded to `bits` bits (per-tensor affine) and back"

    def __init__(self, bits: int = 8) -> None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise FilterError(f"bits must be an integer from 1 to 16, got {bits!r}")
        self.bits = bits

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        levels = 2**self.bits - 1
        ctx.note(self.name, bits=self.bits)

        def rounded(t: Any) -> Any:
            if not _floats(t):
                return t
            x = t.double()
            lo, hi = float(x.min()), float(x.max())
            if hi == lo:
                return t
            step = (hi - lo) / levels
            return (((x - lo) / step).round() * step + lo).to(t.dtype)

        on_update = ctx.point != "aggregate_out" and (
            model.params_type == ParamsType.DIFF or ctx.base is not None
        )
        if not on_update:  # a model to broadcast, or a result without its task's model
            params = model.params or {}
            return replace(model, params=LazyMap(list(params), lambda k: rounded(params[k])))
        update = update_of(model, ctx, self.name)
        return with_update(model, ctx, lambda k: rounded(update[k]))
