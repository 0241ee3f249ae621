"""What one tensor becomes on the wire under compression, and back (docs/compression.md).

Every form is plain tensors in fedctl's framing, which carries int8, float16, bfloat16 and
int32/int64 natively: nothing is packed into bytes by hand, so the codec's header validation
applies to compressed payloads as to any other.

=========  ===================================================  =================================
form       on the wire (``name`` and its companions)             error of one value
=========  ===================================================  =================================
``fp16``   ``name``: float16                                    relative 2⁻¹¹ (values ≤ 65504)
``bf16``   ``name``: bfloat16                                   relative 2⁻⁸
``int8``   ``name``: int8, ``name::scale``: float32 scalar s     ≤ s/2, s = max|x| / 127
``topk``   ``name``: the k kept values, ``name::idx``: their     the values not kept (error
           flat positions (int32, or int64 past 2³¹), ascending  feedback sends them later)
``raw``    ``name`` as it is                                    none
=========  ===================================================  =================================

Decoding checks everything a hostile sender controls (dtypes, shapes, counts, index ranges, the
scale) and raises :class:`~fedctl.privacy.context.FilterFailed` with one line; it never lets a
torch error or an allocation sized by the sender through.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedctl.codec.tensors import dtype_name, torch_dtype
from fedctl.privacy.context import FilterFailed

if TYPE_CHECKING:
    import torch

#: the meta key of a compressed model: ``{"codec", "version", "tensors"[, "nbytes"]}``
META_KEY = "fedctl.compression"
VERSION = 1
#: the companions of a tensor: int8's scale and top-k's positions
SCALE = "::scale"
INDEX = "::idx"
#: the forms each codec may send a tensor in
FORMS = {
    "none": ("raw",),
    "fp16": ("fp16", "raw"),
    "bf16": ("bf16", "raw"),
    "int8": ("int8", "raw"),
    "topk": ("topk", "raw"),
}
#: dtypes a compressed tensor may be restored to
FLOAT_NAMES = ("F16", "BF16", "F32", "F64")
INT8_LEVELS = 127


def is_companion(name: str) -> bool:
    """Whether ``name`` is reserved for a compressed tensor's companion."""
    return name.endswith(SCALE) or name.endswith(INDEX)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for every narrower float (what codecs compute in)."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------- encoding


def encode_half(x: torch.Tensor, form: str) -> torch.Tensor | None:
    """``x`` as float16/bfloat16, or None when that is no smaller or not finite (overflow)."""
    import torch

    target = torch.float16 if form == "fp16" else torch.bfloat16
    if x.element_size() <= 2:
        return None
    h = x.to(target)
    return h if bool(torch.isfinite(h).all()) else None


def encode_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x`` as int8 with a per-tensor scale (symmetric, round to nearest), or None when that
    is no smaller or ``x`` is not finite."""
    import torch

    if x.numel() + 4 >= x.numel() * x.element_size():
        return None
    w = x.to(torch.float32)
    amax = float(w.abs().max())
    if not math.isfinite(amax):
        return None
    scale = torch.tensor(amax / INT8_LEVELS, dtype=torch.float32)
    if amax == 0:
        return torch.zeros(x.shape, dtype=torch.int8), scale
    q = torch.round(w / scale).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return q, scale


def topk_count(n: int, ratio: float) -> int:
    """How many of ``n`` values top-k keeps at ``ratio`` (at least one)."""
    return max(1, min(n, math.ceil(n * ratio - 1e-9)))


def sparse_pays(n: int, k: int, value_size: int) -> bool:
    """Whether k values and their positions are fewer bytes than the n dense values."""
    return k * (value_size + (4 if n < 2**31 else 8)) < n * value_size


def encode_topk(p: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` values of largest magnitude of ``p`` (flattened) as ``dtype``, with their
    positions in ascending order."""
    import torch

    flat = p.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    idx = idx.to(torch.int32) if flat.numel() < 2**31 else idx
    return flat[idx.long()].to(dtype), idx


# ---------------------------------------------------------------------- decoding (hostile input)


def restore_dtype(name: str, declared: object) -> torch.dtype:
    """The float dtype a compressed tensor is restored to (one the sender declared)."""
    if declared not in FLOAT_NAMES:
        raise FilterFailed(f"{name!r}: dtype must be one of {', '.join(FLOAT_NAMES)}")
    assert isinstance(declared, str)
    return torch_dtype(declared)


def _expect(name: str, t: object, dtypes: tuple[str, ...], what: str) -> torch.Tensor:
    import torch

    if not isinstance(t, torch.Tensor):
        raise FilterFailed(f"{name!r}: {what} is not a tensor")
    try:
        dn = dtype_name(t.dtype)
    except Exception:
        dn = str(t.dtype)
    if dn not in dtypes:
        raise FilterFailed(f"{name!r}: {what} is {dn}, expected {' or '.join(dtypes)}")
    return t


def decode_half(name: str, t: object, form: str, dtype: torch.dtype) -> torch.Tensor:
    """A float16/bfloat16 tensor back to ``dtype``."""
    x = _expect(name, t, ("F16",) if form == "fp16" else ("BF16",), "the values")
    return x.to(dtype)


def decode_int8(name: str, q: object, scale: object, dtype: torch.dtype) -> torch.Tensor:
    """int8 values times their scale, as ``dtype``; the scale must be a finite float32 ≥ 0."""
    import torch

    qt = _expect(name, q, ("I8",), "the values")
    st = _expect(name, scale, ("F32",), "the scale")
    if st.dim() != 0:
        raise FilterFailed(f"{name!r}: the scale must be one number, got shape {list(st.shape)}")
    s = float(st)
    if not (math.isfinite(s) and s >= 0):
        raise FilterFailed(f"{name!r}: the scale must be a finite number ≥ 0, got {s}")
    return (qt.to(torch.float32) * st).to(dtype)


def decode_topk(
    name: str, values: object, idx: object, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A dense tensor of ``shape`` (the receiver's, never the sender's) holding ``values`` at
    ``idx`` and zeros elsewhere."""
    import torch

    v = _expect(name, values, (dtype_name(dtype),), "the top-k values")
    i = _expect(name, idx, ("I32", "I64"), "the top-k positions")
    n = math.prod(shape)
    if v.dim() != 1 or i.dim() != 1 or v.numel() != i.numel():
        raise FilterFailed(
            f"{name!r}: top-k values {list(v.shape)} and positions {list(i.shape)} must be "
            "two lists of the same length"
        )
    if i.numel() > n:
        raise FilterFailed(f"{name!r}: {i.numel()} top-k values for a tensor of {n}")
    out = torch.zeros(n, dtype=dtype)
    if i.numel():
        pos = i.long()
        if int(pos[0]) < 0 or int(pos[-1]) >= n or not bool((pos[1:] > pos[:-1]).all()):
            raise FilterFailed(
                f"{name!r}: top-k positions must be strictly increasing within [0, {n})"
            )
        out[pos] = v
    return out.reshape(shape)


def restore_raw(name: str, t: object, dtype: torch.dtype) -> torch.Tensor:
    """A tensor sent as it is: it must have the dtype the sender declared."""
    return _expect(name, t, (dtype_name(dtype),), "the values")
