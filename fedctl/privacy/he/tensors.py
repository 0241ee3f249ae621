"""Encrypting a model's chosen tensors on a site, describing them, and decrypting an aggregate.

A site sends, for each chosen floating tensor ``x`` and its aggregation weight ``w``, the CKKS
encryption of ``w · x.flatten()`` (float64) as one uint8 tensor (layout in
:mod:`fedctl.privacy.he.blob`); other tensors pass unchanged. The JSON *description*, carried
in ``FLModel.meta[HE_META_KEY]``, says how to read them back::

    {"version": 1, "key_id": "<32 hex>", "divisor": w,
     "tensors": {"fc.weight": {"shape": [10, 20], "dtype": "float32", "count": 1}, ...}}

Decrypting divides by ``divisor``: a site's own upload decrypts to its tensors, and the server's
encrypted sum Σ w·x (described with divisor Σ w) decrypts to the weighted mean. The divisor
stays in plain because multiplying a ciphertext by 1/Σw would encode it at the 2^40 scale (a
relative error up to Σw/2^41, 5e-7 for Σw = 1e6) and spend a modulus level; dividing after
decryption is exact to float64.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedctl.constants import MAX_WEIGHT
from fedctl.privacy.he.blob import dump_vector, load_vector, pack, unpack
from fedctl.privacy.he.context import NO_SECRET
from fedctl.privacy.he.params import HEConfigError, HEError, tenseal

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.he.context import HEContext

#: the FLModel.meta key of the description
HE_META_KEY = "he"
DESCRIPTION_VERSION = 1
#: floating dtypes that can be encrypted (their names in a description)
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
MAX_TENSORS = 100_000
MAX_DIMS = 16
MAX_NUMEL = 2**40


@dataclass(frozen=True)
class TensorSpec:
    """One encrypted tensor: its plain shape and dtype, and how many ciphertexts hold it."""

    shape: tuple[int, ...]
    dtype: str
    count: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "count": self.count}


@dataclass(frozen=True)
class Description:
    """A validated description (see the module docstring)."""

    key_id: str
    divisor: float
    tensors: Mapping[str, TensorSpec]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": DESCRIPTION_VERSION,
            "key_id": self.key_id,
            "divisor": self.divisor,
            "tensors": {k: s.to_dict() for k, s in self.tensors.items()},
        }

    def with_divisor(self, divisor: float) -> Description:
        return Description(self.key_id, divisor, self.tensors)


def _bad(problem: str) -> HEError:
    return HEError(f"HE description: {problem}")


def parse_description(value: Any, ctx: HEContext) -> Description:
    """A description from meta, checked against ``ctx`` (key, ciphertext counts) and bounded."""
    if isinstance(value, Description):
        value = value.to_dict()
    if value is None:
        raise _bad(f"missing (meta[{HE_META_KEY!r}] describes the encrypted tensors)")
    if not isinstance(value, Mapping) or set(value) != {"version", "key_id", "divisor", "tensors"}:
        raise _bad("must be a mapping of version, key_id, divisor and tensors")
    if value["version"] != DESCRIPTION_VERSION:
        raise _bad(f"version {value['version']!r} (this fedctl reads {DESCRIPTION_VERSION})")
    if value["key_id"] != ctx.key_id:
        raise _bad(
            f"made under another key (key id {value['key_id']!r}, this context has {ctx.key_id})"
        )
    divisor = value["divisor"]
    if isinstance(divisor, bool) or not isinstance(divisor, int | float):
        raise _bad(f"divisor must be a number, got {divisor!r}")
    if not (math.isfinite(divisor) and divisor >= 0):
        raise _bad(f"divisor must be finite and ≥ 0, got {divisor}")
    tensors = value["tensors"]
    if not isinstance(tensors, Mapping) or len(tensors) > MAX_TENSORS:
        raise _bad(f"tensors must be a mapping of at most {MAX_TENSORS} entries")
    specs: dict[str, TensorSpec] = {}
    for name, spec in tensors.items():
        if not isinstance(name, str) or not isinstance(spec, Mapping):
            raise _bad(f"entry {name!r} must be a name and a mapping")
        if set(spec) != {"shape", "dtype", "count"}:
            raise _bad(f"{name!r} must have exactly shape, dtype and count")
        shape, dtype, count = spec["shape"], spec["dtype"], spec["count"]
        if (
            not isinstance(shape, list | tuple)
            or len(shape) > MAX_DIMS
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)
            or math.prod(shape) > MAX_NUMEL
        ):
            raise _bad(f"{name!r}: shape must be at most {MAX_DIMS} sizes ≥ 0, got {shape!r}")
        if dtype not in FLOAT_DTYPES:
            raise _bad(f"{name!r}: dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
        expected = ctx.params.count(math.prod(shape))
        if count != expected or isinstance(count, bool):
            raise _bad(f"{name!r}: count {count!r}, but shape {list(shape)} needs {expected}")
        specs[name] = TensorSpec(tuple(shape), dtype, count)
    return Description(value["key_id"], float(divisor), specs)


def select_keys(params: Mapping[str, Any], keys: Sequence[str] | None) -> list[str]:
    """The names to encrypt: ``keys`` (checked to exist and be floating) or every floating one."""
    if keys is None:
        return [k for k, t in params.items() if str(t.dtype).removeprefix("torch.") in FLOAT_DTYPES]
    if isinstance(keys, str):
        raise HEConfigError(f"keys must be a list of parameter names, got the string {keys!r}")
    unknown = [k for k in keys if k not in params]
    if unknown:
        hints = []
        for k in unknown[:5]:
            close = difflib.get_close_matches(str(k), [str(p) for p in params], n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise HEConfigError(
            f"cannot encrypt unknown parameter(s) {', '.join(hints)}{more}; the model has "
            f"{len(params)} parameters"
        )
    for k in keys:
        _dtype_name(params[k], k)
    return list(dict.fromkeys(keys))


def _dtype_name(t: Any, name: str | None = None) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in FLOAT_DTYPES:
        raise HEConfigError(
            f"parameter {name!r} is {dtype}: only {', '.join(FLOAT_DTYPES)} tensors are encrypted"
        )
    return dtype


def describe_params(
    params: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None,
    ctx: HEContext,
    divisor: float = 1.0,
) -> dict[str, Any]:
    """The description :func:`encrypt_params` gives for these tensors (without encrypting)."""
    specs = {}
    for k in select_keys(params, keys):
        t = params[k]
        specs[k] = TensorSpec(tuple(t.shape), _dtype_name(t), ctx.params.count(t.numel()))
    return Description(ctx.key_id, float(divisor), specs).to_dict()


def encrypt_params(
    params: Mapping[str, torch.Tensor],
    keys: Sequence[str] | None,
    ctx: HEContext,
    weight: float,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encrypt ``weight × tensor`` for each chosen floating tensor (``keys=None``: all of them).

    Returns the params with those tensors replaced by uint8 ciphertext tensors (the others are
    the same objects) and the description for ``FLModel.meta[HE_META_KEY]`` (divisor ``weight``).
    Refuses NaN or infinite values, and ``|weight × value|`` beyond what sums of many sites can
    hold under these parameters (``HEParams.max_site_value``).
    """
    import torch

    ts = tenseal()
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise HEConfigError(f"weight must be a number, got {weight!r}")
    if not (math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
        raise HEConfigError(f"weight must be within [0, {MAX_WEIGHT:.0e}], got {weight}")
    chosen = select_keys(params, keys)
    native = ts._ts_cpp.CKKSVector  # takes a numpy array without two copies through lists
    slots, limit = ctx.params.slots, ctx.params.max_site_value
    out = dict(params)
    desc = describe_params(params, chosen, ctx, float(weight))
    for k in chosen:
        x = params[k].detach().to("cpu", torch.float64, copy=True).flatten()  # never in place
        if weight != 1:
            x.mul_(weight)
        values = x.numpy()
        if values.size:
            top = float(abs(values).max())
            if not math.isfinite(top):
                raise HEError(f"parameter {k!r}: NaN or infinite values cannot be encrypted")
            if top > limit:
                raise HEError(
                    f"parameter {k!r}: |weight × value| reaches {top:.3g}, more than these HE "
                    f"parameters can sum without overflow ({limit:.3g}); lower the weight or "
                    "widen coeff_mod_bit_sizes"
                )
        cts = [
            dump_vector(native(ctx.ts_context.data, values[i : i + slots]))
            for i in range(0, values.size, slots)
        ]
        out[k] = pack(ctx.key_id, cts)
    return out, desc


def decrypt_params(
    params: Mapping[str, torch.Tensor], description: Any, ctx: HEContext
) -> dict[str, torch.Tensor]:
    """The plain tensors of the encrypted ones ``description`` lists, divided by its divisor,
    with their shapes and dtypes back; other tensors pass unchanged. Needs the secret key."""
    import numpy as np
    import torch

    tenseal()
    if not ctx.has_secret_key:
        raise HEError(NO_SECRET)
    desc = parse_description(description, ctx)
    if desc.tensors and desc.divisor <= 0:
        raise _bad("divisor is 0: no weight went into these ciphertexts")
    slots = ctx.params.slots
    out = dict(params)
    for k, spec in desc.tensors.items():
        what = f"parameter {k!r}"
        if k not in params:
            raise HEError(f"{what}: missing (the HE description lists it as encrypted)")
        cts = unpack(params[k], ctx, spec.count, what)  # framing checked before allocating
        values = np.empty(spec.numel, dtype=np.float64)
        for i, ct in enumerate(cts):
            n = min(slots, spec.numel - i * slots)
            vec = load_vector(ctx, ct, n, f"{what}, ciphertext {i}")
            try:
                values[i * slots : i * slots + n] = vec.decrypt()
            except Exception as exc:
                raise HEError(f"{what}, ciphertext {i}: does not decrypt ({exc})") from None
        if desc.divisor != 1:
            values /= desc.divisor
        dtype = getattr(torch, spec.dtype)
        if values.size and not float(abs(values).max()) <= torch.finfo(dtype).max:
            raise HEError(
                f"{what}: decrypts to values beyond {spec.dtype} (another key, or a sum that "
                "overflowed the parameters)"
            )
        out[k] = torch.from_numpy(values).to(dtype).reshape(spec.shape)
    return out
