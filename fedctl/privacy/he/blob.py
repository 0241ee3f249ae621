"""One encrypted tensor as bytes: the layout of its uint8 tensor, and loading its ciphertexts.

Layout (all integers little-endian)::

    b"FHE1" | key id (16 bytes) | u32 count | count × u32 byte length | the ciphertexts

Ciphertext ``i`` is SEAL's serialization of the CKKS encryption of values
``[i·slots, (i+1)·slots)`` of the flattened tensor (the last one holds the rest). Only SEAL's
ciphertext travels: the TenSEAL wrapper around it (how many values, the scale) is rebuilt here
from what the receiver already knows, so bytes from the network reach only SEAL's loader, which
checks them against the context (SEAL validates every coefficient). Sizes are bounded before
anything is read; a loaded ciphertext must be a fresh-level, two-polynomial ciphertext at the
context's scale.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from fedctl.privacy.he.params import HEError
from fedctl.privacy.he.params import tenseal as _tenseal

if TYPE_CHECKING:
    import torch

    from fedctl.privacy.he.context import HEContext

BLOB_MAGIC = b"FHE1"
_HEAD = struct.Struct("<4s16sI")
_LEN = struct.Struct("<I")


def blob_bound(ctx: HEContext, count: int) -> int:
    """The most bytes an encrypted tensor of ``count`` ciphertexts may have."""
    return _HEAD.size + count * (_LEN.size + ctx.params.max_ciphertext_bytes)


def pack(key_id: str, cts: list[bytes]) -> torch.Tensor:
    """The uint8 tensor holding ``cts`` (consumed: the list is emptied as it is copied)."""
    import torch

    count = len(cts)
    head = _HEAD.size + count * _LEN.size
    buf = bytearray(head + sum(len(c) for c in cts))
    _HEAD.pack_into(buf, 0, BLOB_MAGIC, bytes.fromhex(key_id), count)
    pos = head
    for i in range(count):
        ct = cts[i]
        _LEN.pack_into(buf, _HEAD.size + i * _LEN.size, len(ct))
        buf[pos : pos + len(ct)] = ct
        pos += len(ct)
        cts[i] = b""  # free each ciphertext once copied
    cts.clear()
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


def unpack(t: Any, ctx: HEContext, count: int, what: str) -> list[memoryview]:
    """The ``count`` ciphertexts of encrypted tensor ``t`` (views, no copy), after checking its
    framing.

    Checks that ``t`` is a 1-D uint8 tensor no larger than ``count`` ciphertexts can be, made
    under ``ctx``'s key, holding exactly ``count`` ciphertexts whose lengths add up.
    """
    import torch

    if not isinstance(t, torch.Tensor):
        raise HEError(f"{what}: expected an encrypted tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8 or t.dim() != 1:
        kind = "plain values" if t.is_floating_point() else f"a {t.dtype} tensor"
        raise HEError(f"{what}: {kind} of shape {tuple(t.shape)} where a ciphertext is expected")
    limit = blob_bound(ctx, count)
    if t.numel() > limit:
        raise HEError(
            f"{what}: {t.numel()} bytes of ciphertext, more than {count} ciphertext(s) can take "
            f"({limit})"
        )
    if t.numel() < _HEAD.size:
        raise HEError(f"{what}: {t.numel()} bytes, too short to be an encrypted tensor")
    view = memoryview(t.detach().cpu().contiguous().numpy().data).cast("B")
    magic, key, n = _HEAD.unpack_from(view, 0)
    if magic != BLOB_MAGIC:
        raise HEError(f"{what}: not an encrypted tensor (bad magic)")
    if key.hex() != ctx.key_id:
        raise HEError(
            f"{what}: encrypted under another key (key id {key.hex()}, this context has "
            f"{ctx.key_id})"
        )
    if n != count:
        raise HEError(f"{what}: {n} ciphertexts, the description says {count}")
    head = _HEAD.size + n * _LEN.size
    if len(view) < head:
        raise HEError(f"{what}: truncated ciphertext table")
    lengths = [_LEN.unpack_from(view, _HEAD.size + i * _LEN.size)[0] for i in range(n)]
    if head + sum(lengths) != len(view):
        raise HEError(
            f"{what}: ciphertext lengths add up to {head + sum(lengths)} bytes, the tensor has "
            f"{len(view)} (truncated or padded)"
        )
    out, pos = [], head
    for length in lengths:
        out.append(view[pos : pos + length])
        pos += length
    return out


# --------------------------------------------------------------------------- TenSEAL wrapper


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = data[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def wrap(ct: bytes | memoryview, size: int, scale: float) -> bytes:
    """TenSEAL's CKKSVectorProto for one ciphertext of ``size`` values at ``scale``."""
    sizes = _varint(size)
    return b"".join(
        (
            b"\x0a" + _varint(len(sizes)) + sizes,  # field 1: packed sizes
            b"\x12" + _varint(len(ct)),  # field 2: the ciphertext
            ct,
            b"\x19" + struct.pack("<d", scale),  # field 3: the scale
        )
    )


def unwrap(data: bytes) -> bytes:
    """The one SEAL ciphertext of a CKKSVectorProto that TenSEAL made here (trusted input)."""
    i, found = 0, []
    while i < len(data):
        tag, i = _read_varint(data, i)
        kind = tag & 7
        if kind == 2:
            n, i = _read_varint(data, i)
            if tag >> 3 == 2:
                found.append(data[i : i + n])
            i += n
        elif kind == 1:
            i += 8
        elif kind == 0:
            _, i = _read_varint(data, i)
        else:
            raise HEError(f"unexpected field type {kind} in a TenSEAL vector")
    if len(found) != 1:
        raise HEError(f"a TenSEAL vector with {len(found)} ciphertexts where one was expected")
    return found[0]


def load_vector(ctx: HEContext, ct: bytes | memoryview, size: int, what: str) -> Any:
    """The TenSEAL vector of ``size`` values in ciphertext ``ct``, checked to be fresh-level,
    two polynomials, at the context's scale; HEError naming ``what`` otherwise."""
    ts = ctx.ts_context
    params = ctx.params
    if len(ct) > params.max_ciphertext_bytes:
        raise HEError(f"{what}: {len(ct)} bytes, larger than any ciphertext of these parameters")
    tenseal = _tenseal()

    try:
        vec = tenseal.ckks_vector_from(ts, wrap(ct, size, params.scale))
        c = vec.ciphertext()[0]
        seal = ts.seal_context().data
        if c.parms_id() != seal.first_parms_id():
            raise HEError(f"{what}: ciphertext is at another level or made with other parameters")
        if c.size() != 2 or not c.is_ntt_form() or c.scale != params.scale:
            raise HEError(f"{what}: not a fresh ciphertext (size {c.size()}, scale {c.scale:.3g})")
    except HEError:
        raise
    except Exception as exc:  # SEAL's loader: ValueError, RuntimeError, ...
        raise HEError(f"{what}: ciphertext does not load ({exc})") from None
    return vec


def dump_vector(vec: Any) -> bytes:
    """The SEAL ciphertext bytes of a one-ciphertext TenSEAL vector."""
    return unwrap(vec.serialize())
