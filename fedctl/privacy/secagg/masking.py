"""Masks for secure aggregation: seeds agreed pairwise over X25519, expanded by ChaCha20.

* :func:`pair_seed`: the 32-byte seed two parties share, ``HKDF-SHA256(X25519(s_sk_u,
  s_pk_v))`` with the session and both ids (in order) in ``info``, so the same keys give
  unrelated seeds in another session or for another pair.
* :func:`prg`: a seed expanded into ``length`` integers uniform in ``[0, 2**k)``: the ChaCha20
  keystream under the seed (a zero nonce: every seed keys exactly one stream), read as
  little-endian 64-bit words and reduced to their low ``k`` bits. About 50 ms for 10M values.
  Sums of masks are taken on the raw words mod 2**64 and reduced mod 2**k once at the end
  (the same result, since 2**k divides 2**64).
* :func:`mask` and :func:`unmask`: ``y = v + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2**k``, the sign
  ``+`` when ``u``'s id sorts before ``v``'s and ``-`` after, so the pair's masks cancel in a
  sum over both; the self-mask ``PRG(b_u)`` is what the server removes once it learns ``b_u``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedctl.privacy.secagg.errors import SecAggError
from fedctl.privacy.secagg.quantize import MAX_MODULUS_BITS

#: bytes of every seed (self-mask seeds b_u and pairwise seeds s_uv)
SEED_BYTES = 32
#: the most values in one vector (int64 storage: 16 GiB)
MAX_LENGTH = 2**31 - 1
_CHUNK = 1 << 20


def encode_fields(*fields: str | bytes) -> bytes:
    """Fields as one unambiguous byte string (each prefixed by its 4-byte length)."""
    out = bytearray()
    for f in fields:
        raw = f.encode() if isinstance(f, str) else bytes(f)
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def hkdf(secret: bytes, *info: str | bytes) -> bytes:
    """32 bytes of HKDF-SHA256 of ``secret`` with the encoded ``info`` fields."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=encode_fields(*info)).derive(
        secret
    )


def exchange(own: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    """X25519 of two keys; a peer key of small order (an all-zero result) is refused."""
    try:
        return own.exchange(peer)
    except ValueError:
        raise SecAggError("a peer's X25519 key is degenerate (small order)") from None


def pair_seed(own: X25519PrivateKey, peer: X25519PublicKey, session: str, a: str, b: str) -> bytes:
    """The pairwise mask seed of parties ``a`` and ``b`` (either order) in ``session``."""
    lo, hi = sorted((a, b))
    return hkdf(exchange(own, peer), "fedctl-secagg/v1/pair-mask", session, lo, hi)


def _check(length: int, bits: int) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= MAX_LENGTH:
        raise SecAggError(f"mask length must be in 0..{MAX_LENGTH}, got {length!r}")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_MODULUS_BITS:
        raise SecAggError(f"mask modulus bits must be in 1..{MAX_MODULUS_BITS}, got {bits!r}")


def _keystream(seed: bytes, length: int, buf: bytearray | None = None) -> np.ndarray:
    """The first ``length`` little-endian 64-bit words of the ChaCha20 keystream under
    ``seed`` (a zero nonce), as uint64, written into ``buf`` (reused across calls) if given."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed is {SEED_BYTES} bytes")
    total = 8 * length
    if buf is None or len(buf) < total + 16:
        buf = bytearray(total + 16)  # update_into wants room for a block
    view = memoryview(buf)
    zeros = memoryview(bytes(min(_CHUNK, total)))
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    for off in range(0, total, _CHUNK):
        n = min(_CHUNK, total - off)
        stream.update_into(zeros[:n], view[off : off + n + 16])
    return np.frombuffer(buf, dtype="<u8", count=length)


def prg(seed: bytes, length: int, bits: int) -> torch.Tensor:
    """``length`` int64 values uniform in ``[0, 2**bits)``, a deterministic function of the
    32-byte ``seed``."""
    _check(length, bits)
    words = _keystream(seed, length) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(words.view(np.int64))


def sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the pair's mask (its id sorts first), -1 if it subtracts it."""
    if me == peer:
        raise SecAggError(f"no pairwise mask of {me!r} with itself")
    return 1 if me < peer else -1


class _Accumulator:
    """A sum of masks mod ``2**bits``, kept mod 2**64 in uint64 (numpy wraps uint64 around,
    and 2**bits divides 2**64) and reduced once at the end: one pass over the values a mask."""

    def __init__(self, values: torch.Tensor, bits: int) -> None:
        _check_values(values, bits)
        self.bits = bits
        self.acc = values.cpu().numpy().astype(np.uint64)  # a copy
        self.buf = bytearray(8 * values.numel() + 16)

    def add(self, seed: bytes, sgn: int) -> None:
        words = _keystream(seed, self.acc.size, self.buf)
        if sgn > 0:
            np.add(self.acc, words, out=self.acc)
        else:
            np.subtract(self.acc, words, out=self.acc)

    def result(self) -> torch.Tensor:
        self.acc &= np.uint64((1 << self.bits) - 1)
        return torch.from_numpy(self.acc.view(np.int64))


def mask(
    values: torch.Tensor,
    self_seed: bytes,
    pair_seeds: Mapping[str, bytes],
    me: str,
    bits: int,
) -> torch.Tensor:
    """``values + PRG(self_seed) + Σ sign(me, v)·PRG(pair_seeds[v]) mod 2**bits``: party
    ``me``'s masked input (``values``: a 1-D int64 tensor in ``[0, 2**bits)``)."""
    acc = _Accumulator(values, bits)
    signs = {peer: sign(me, peer) for peer in pair_seeds}
    acc.add(self_seed, 1)
    for peer, seed in pair_seeds.items():
        acc.add(seed, signs[peer])
    return acc.result()


def unmask(
    total: torch.Tensor,
    self_seeds: Mapping[str, bytes],
    pair_seeds: Mapping[tuple[str, str], bytes],
    bits: int,
) -> torch.Tensor:
    """``total`` (a modular sum of masked inputs) with the given masks taken off: the
    self-masks of ``self_seeds`` (party → b_u) and, for each ``(u, v) → s_uv`` in
    ``pair_seeds``, the mask survivor ``u`` applied against party ``v`` who dropped."""
    acc = _Accumulator(total, bits)
    signs = {pair: sign(*pair) for pair in pair_seeds}
    for seed in self_seeds.values():
        acc.add(seed, -1)
    for pair, seed in pair_seeds.items():
        acc.add(seed, -signs[pair])
    return acc.result()


def _check_values(values: torch.Tensor, bits: int) -> None:
    if not isinstance(values, torch.Tensor) or values.dtype != torch.int64 or values.dim() != 1:
        raise SecAggError("masking needs a 1-D int64 tensor")
    _check(values.numel(), bits)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >> bits):
        raise SecAggError(f"masking: a value is outside 0..2**{bits} - 1")
