"""What every privacy filter is built on: the points, the context a filter runs with, the
update helpers (a result's update is its params minus the model its task carried) and the
:class:`Filter` base class. The filters themselves are in :mod:`fedctl.privacy.builtin`, the
registry, specs and chains in :mod:`fedctl.privacy.filters`.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedctl.codec.model import FLModel, LazyMap, ParamsType
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
    randomness (simulation). Filters report what they did with :meth:`note`. ``task`` is the
    task's name (train, evaluate, submit_model) where it is known; ``state_dir`` is where a site
    keeps what its filters carry from round to round (top-k's residual); a compression filter
    at ``aggregate_out`` leaves the model it encoded in ``unencoded`` (the server's reference
    for the results).
    """

    point: str
    site: str | None = None
    round: int | None = None
    base: Params | None = None
    seed: int | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)
    task: str | None = None
    state_dir: Path | None = None
    unencoded: FLModel | None = None
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
