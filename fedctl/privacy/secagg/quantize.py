"""Fixed-point quantization for secure aggregation, with overflow impossible by construction.

Each value is clipped to ``[-B, B]`` and mapped affinely onto the integers ``0..2**q - 1``
(``-B → 0``, ``B → 2**q - 1``; the step is ``Δ = 2B / (2**q - 1)``). The sum of ``n`` such
integers is at most ``n·(2**q - 1) < 2**(q + ⌈log2 n⌉)``, so sums are taken modulo
``2**k`` with ``k = q + ⌈log2 n⌉ + 1`` (one spare bit): the modular sum of the survivors'
values *is* their integer sum, never wrapped, whoever drops out. :meth:`Quantizer.dequantize`
turns it back into the float sum, removing the ``count·B`` of offsets. ``k ≤ 62``, so values,
masks and the sum of any two of them fit in int64.

Error of the dequantized sum of ``count`` values, per coordinate (values inside ``[-B, B]``;
clipping is not counted, it is the caller's bound):

* rounding to nearest: each value is off by at most ``Δ/2``, the sum by at most
  ``count·Δ/2 = count·B / (2**q - 1)``;
* unbiased stochastic rounding (round up with probability the fractional part): each value is
  off by less than ``Δ``, the sum by less than ``count·Δ = 2·count·B / (2**q - 1)`` in the worst
  case, but the errors are independent with mean zero, so the typical error is about
  ``√count·Δ/2`` and averages out across rounds;

plus float64 rounding of the final ``S·Δ - count·B`` (relative 2**-52, negligible for q ≤ 48).

Weighted means: send ``w·x`` and ``w`` in one vector (:func:`pack_weighted`). With every
coordinate of ``x`` within the clipping bound ``C`` (an update clipped to L2 norm ``C`` has
every coordinate within ``C``) and weights in ``[0, W]``, ``pack_weighted`` sends ``w·x/C`` and
``w``, both within ``[-W, W]``: choose ``B = W`` (:func:`weighted_bound`), and ``q`` from the
error wanted: the error of ``Σw·x`` is at most ``n·W·C / (2**q - 1)`` and that of ``Σw`` at most
``n·W / (2**q - 1)``, so ``q ≥ log2(n·W·C / ε)`` for an error ``ε`` (e.g. 100 sites, W = 1,
C = 1, ε = 1e-6: q = 27). Normalising weights to at most 1 (``W = 1``) is simplest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError

#: the largest modulus exponent k (values, masks and a sum of two fit in int64)
MAX_MODULUS_BITS = 62
#: the most bits per value (float64 represents 2**52 levels exactly)
MAX_BITS = 52
#: the most parties (shares are numbered in 16 bits)
MAX_PARTIES = 65_535


@dataclass(frozen=True)
class Quantizer:
    """Clip to ``[-bound, bound]``, ``bits`` (q) bits per value, sums of up to ``parties``."""

    bound: float
    bits: int
    parties: int

    def __post_init__(self) -> None:
        b = self.bound
        if not (isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b)):
            raise SecAggConfigError(f"quantization bound must be a finite number, got {b!r}")
        if b <= 0:
            raise SecAggConfigError(f"quantization bound must be > 0, got {b!r}")
        for name, value, top in (("bits", self.bits, MAX_BITS), ("parties", self.parties, None)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise SecAggConfigError(f"quantization {name} must be an integer, got {value!r}")
            if value < 1 or (top is not None and value > top):
                limit = f"1..{top}" if top else "at least 1"
                raise SecAggConfigError(f"quantization {name} must be {limit}, got {value}")
        if self.parties > MAX_PARTIES:
            raise SecAggConfigError(f"at most {MAX_PARTIES} parties, got {self.parties}")
        if self.modulus_bits > MAX_MODULUS_BITS:
            raise SecAggConfigError(
                f"q + ⌈log2 n⌉ + 1 = {self.bits} + {math.ceil(math.log2(self.parties))} + 1 = "
                f"{self.modulus_bits} bits is over {MAX_MODULUS_BITS}: use fewer bits per value"
            )

    @property
    def levels(self) -> int:
        """The largest quantized value, ``2**q - 1``."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Δ, the float distance between two neighbouring quantized values."""
        return 2.0 * self.bound / self.levels

    @property
    def modulus_bits(self) -> int:
        """k: sums are taken modulo ``2**k``."""
        return self.bits + math.ceil(math.log2(self.parties)) + 1

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    def error_bound(self, count: int, *, stochastic: bool = False) -> float:
        """The most the dequantized sum of ``count`` in-range values can be off, per value."""
        return count * self.step * (1.0 if stochastic else 0.5)

    def quantize(
        self, values: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """int64 integers in ``[0, 2**q)`` of the flattened ``values``: rounded to nearest, or
        with a ``generator``, stochastically rounded (unbiased). Refuses NaN and infinities."""
        if not isinstance(values, torch.Tensor):
            raise SecAggError(f"quantize needs a tensor, got {type(values).__name__}")
        if values.is_complex() or values.dtype == torch.bool:
            raise SecAggError(f"quantize needs real numbers, got a {values.dtype} tensor")
        v = values.detach().reshape(-1).to(torch.float64)
        if not bool(torch.isfinite(v).all()):
            raise SecAggError("quantize: the values contain NaN or infinity")
        v = v.clamp(-self.bound, self.bound).add_(self.bound).mul_(self.levels / (2 * self.bound))
        if generator is None:
            v.round_()
        else:
            v.add_(torch.rand(v.shape, generator=generator, dtype=torch.float64)).floor_()
        return v.clamp_(0, self.levels).to(torch.int64)

    def dequantize(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """The float64 sum of ``count`` values from the integer sum of their quantizations."""
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= self.parties:
            raise SecAggError(f"dequantize: count must be in 0..{self.parties}, got {count!r}")
        if not isinstance(total, torch.Tensor) or total.dtype != torch.int64:
            raise SecAggError("dequantize needs an int64 tensor")
        if total.numel() and (int(total.min()) < 0 or int(total.max()) > count * self.levels):
            raise SecAggError(
                f"dequantize: a value is outside 0..{count}·(2**{self.bits} - 1): "
                "not a sum of that many quantized values"
            )
        return total.to(torch.float64).mul_(self.step).sub_(count * self.bound)


def weighted_bound(max_weight: float) -> float:
    """The quantization bound B for vectors made by :func:`pack_weighted` with weights in
    ``[0, max_weight]`` (whatever the clipping bound: the values are sent divided by it)."""
    if not (isinstance(max_weight, int | float) and math.isfinite(max_weight) and max_weight > 0):
        raise SecAggConfigError(f"max_weight must be a finite number > 0, got {max_weight!r}")
    return float(max_weight)


def pack_weighted(values: torch.Tensor, weight: float, clip: float) -> torch.Tensor:
    """One float64 vector ``[w·x/C..., w]`` of ``values`` x (every coordinate within the
    clipping bound C) and the weight w ≥ 0: its secure sum unpacks to ``(Σw·x, Σw)``."""
    if not isinstance(values, torch.Tensor):
        raise SecAggError(f"pack_weighted needs a tensor, got {type(values).__name__}")
    if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
        raise SecAggConfigError(f"clip must be a finite number > 0, got {clip!r}")
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
        raise SecAggError(f"weight must be a finite number ≥ 0, got {weight!r}")
    flat = values.detach().reshape(-1).to(torch.float64) * (float(weight) / clip)
    return torch.cat([flat, torch.tensor([float(weight)], dtype=torch.float64)])


def unpack_weighted(total: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """``(Σw·x, Σw)`` from the secure sum of :func:`pack_weighted` vectors."""
    if not isinstance(total, torch.Tensor) or total.dim() != 1 or total.numel() < 1:
        raise SecAggError("unpack_weighted needs a non-empty 1-D tensor")
    if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
        raise SecAggConfigError(f"clip must be a finite number > 0, got {clip!r}")
    return total[:-1] * clip, float(total[-1])
