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
import fnmatch
import hashlib
import inspect
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from fedctl.codec.jsondata import check_json
from fedctl.codec.model import NUM_STEPS_KEY, FLModel, LazyMap, ParamsType
from fedctl.errors import CodecError, UsageError

if TYPE_CHECKING:
    import torch

Params = Mapping[str, "torch.Tensor"]

POINTS = ("task_in", "result_out", "result_in", "aggregate_out")


class FilterError(UsageError):
    """A filter spec that names no filter, an unknown argument, or a bad value."""


class FilterFailed(CodecError):
    """A filter could not be applied to a model (e.g. an update without the model it is for)."""


# ---------------------------------------------------------------------- context and lazy maps


@dataclass
class FilterContext:
    """What a filter may know where it runs.

    ``base`` is the model the task carried (a result's update is its params minus ``base``);
    ``seed`` None means secret randomness (real sites and servers), an int reproducible
    randomness (simulation). Filters report what they did with :meth:`note`.
    """

    point: str
    site: str | None = None
    round: int | None = None
    base: Params | None = None
    seed: int | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)
    _salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def generator(self, *tags: Any) -> torch.Generator:
        """A torch generator for ``tags`` (same tags, same numbers within one application, so
        a tensor read twice from a lazy mapping has the same noise)."""
        import torch

        key = f"{self.point}:{self.site}:{self.round}:" + ":".join(map(str, tags))
        root = str(self.seed).encode() if self.seed is not None else self._salt
        digest = hashlib.blake2b(key.encode(), key=root[:64], digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def note(self, filter_name: str, **facts: Any) -> None:
        """Record what a filter did (audit trail, run log)."""
        self.notes.append({"filter": filter_name, **facts})


def _floats(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


def update_of(model: FLModel, ctx: FilterContext, what: str) -> Params:
    """The update a result carries: its params for DIFF, params minus the task's model for
    FULL (computed per tensor when read)."""
    params = model.params or {}
    if model.params_type == ParamsType.DIFF:
        return params
    base = ctx.base
    if base is None:
        raise FilterFailed(f"{what} works on updates and needs the model the task carried")

    def diff(k: str) -> Any:
        t = params[k]
        g = base.get(k)
        if g is None or not _floats(t):
            return t
        return t - g.to(t.dtype)

    return LazyMap(list(params), diff)


def with_update(model: FLModel, ctx: FilterContext, new: Callable[[str], Any]) -> FLModel:
    """``model`` with its update replaced by ``new(key)`` (a FULL result stays FULL: the task's
    model plus the new update), computed per tensor when read."""
    params = model.params or {}
    if model.params_type == ParamsType.DIFF:
        return replace(model, params=LazyMap(list(params), new))
    base = ctx.base
    assert base is not None

    def full(k: str) -> Any:
        t = params[k]
        g = base.get(k)
        if g is None or not _floats(t):
            return t
        return (g.to(t.dtype) + new(k)).to(t.dtype)

    return replace(model, params=LazyMap(list(params), full))


# ---------------------------------------------------------------------- filters


class Filter:
    """A declarative transformation; subclasses set ``name`` and ``points`` and validate their
    keyword arguments in ``__init__`` (stored under the same names for :meth:`spec`)."""

    name: ClassVar[str] = ""
    #: where it may run
    points: ClassVar[tuple[str, ...]] = ()
    #: where it runs when a spec gives no ``at``
    default_point: ClassVar[str] = "result_out"
    #: one line for docs and `recipe show`
    summary: ClassVar[str] = ""

    def apply(self, model: FLModel, ctx: FilterContext) -> FLModel:
        """The filtered model (never modifies ``model`` or its tensors)."""
        raise NotImplementedError

    def args(self) -> dict[str, Any]:
        """The filter's arguments as plain data."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.args().items())
        return f"{self.name}({args})"


def _number(
    name: str, value: Any, *, low: float, high: float = math.inf, open_low: bool = False
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        rng = f"{'>' if open_low else '≥'} {low}" + (f" and ≤ {high}" if high < math.inf else "")
        raise FilterError(f"{name} must be a number {rng}, got {value!r}")
    return float(value)


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
