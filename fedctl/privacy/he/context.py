"""CKKS contexts: making one, its public form, and loading either from bytes.

A context travels (in kits, between processes) as fedctl's envelope around TenSEAL's
serialization::

    b"FEDCTL-HE\\0" | u8 version | u32 LE header length | JSON header | TenSEAL context

The header names the parameters, whether the secret key is inside, and a key id (the first 16
bytes of the SHA-256 of the public context, fixed when the context is made) that every
ciphertext carries, so data made under another key is refused by name instead of decrypting to
noise. The header is checked, and the size bounded, before TenSEAL sees a byte; after loading,
the context must match its header. :func:`context_info` reads the header alone, without TenSEAL
(``fedctl kit verify`` reports it that way). Contexts hold no evaluation keys: adding
ciphertexts and multiplying them by plain numbers need none.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from fedctl.privacy.he.params import (
    DEFAULT_COEFF_MOD_BIT_SIZES,
    DEFAULT_GLOBAL_SCALE_BITS,
    DEFAULT_POLY_MODULUS_DEGREE,
    HEConfigError,
    HEError,
    HEParams,
    tenseal,
)

MAGIC = b"FEDCTL-HE\x00"
VERSION = 1
MAX_HEADER_BYTES = 4096
_PREFIX = struct.Struct("<BI")
KEY_ID_BYTES = 16
NO_SECRET = "this context holds no secret key: only sites can decrypt"


@dataclass(frozen=True)
class ContextInfo:
    """What a context's header says: its parameters, key id and whether it can decrypt."""

    params: HEParams
    key_id: str
    has_secret_key: bool

    def describe(self) -> str:
        kind = "secret key (decrypts)" if self.has_secret_key else "public only (cannot decrypt)"
        return f"{self.params.describe()}, key id {self.key_id}, {kind}"


def _envelope(info: ContextInfo, body: bytes) -> bytes:
    header = json.dumps(
        {
            "scheme": "ckks",
            "key_id": info.key_id,
            "secret": info.has_secret_key,
            **info.params.to_dict(),
        },
        sort_keys=True,
    ).encode()
    return MAGIC + _PREFIX.pack(VERSION, len(header)) + header + body


def _split(data: bytes, source: str) -> tuple[ContextInfo, memoryview]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HEError(f"{source}: expected bytes, got {type(data).__name__}")
    view = memoryview(data)
    head = len(MAGIC) + _PREFIX.size
    if len(view) < head or bytes(view[: len(MAGIC)]) != MAGIC:
        raise HEError(f"{source}: not a fedctl homomorphic-encryption context")
    version, hlen = _PREFIX.unpack_from(view, len(MAGIC))
    if version != VERSION:
        raise HEError(f"{source}: context format version {version} (this fedctl reads {VERSION})")
    if hlen > MAX_HEADER_BYTES or head + hlen > len(view):
        raise HEError(f"{source}: truncated or oversized context header")
    try:
        hdr = json.loads(bytes(view[head : head + hlen]))
    except (ValueError, UnicodeDecodeError):
        raise HEError(f"{source}: context header is not valid JSON") from None
    expected = {"scheme", "key_id", "secret", "poly_modulus_degree", "coeff_mod_bit_sizes"}
    if (
        not isinstance(hdr, dict)
        or set(hdr) != {*expected, "global_scale_bits"}
        or hdr["scheme"] != "ckks"
        or not isinstance(hdr["secret"], bool)
        or not isinstance(hdr["key_id"], str)
        or len(hdr["key_id"]) != 2 * KEY_ID_BYTES
        or any(c not in "0123456789abcdef" for c in hdr["key_id"])
    ):
        raise HEError(f"{source}: context header is not a CKKS context description")
    try:
        params = HEParams.check(
            hdr["poly_modulus_degree"], hdr["coeff_mod_bit_sizes"], hdr["global_scale_bits"]
        )
    except HEConfigError as exc:
        raise HEError(f"{source}: unusable parameters: {exc}") from None
    body = view[head + hlen :]
    if len(body) > params.max_context_bytes:
        raise HEError(
            f"{source}: {len(body)} bytes of context, more than {params.max_context_bytes} "
            "these parameters ever need"
        )
    return ContextInfo(params, hdr["key_id"], hdr["secret"]), body


def context_info(data: bytes, *, source: str = "HE context") -> ContextInfo:
    """The header of a serialized context, checked (TenSEAL is not needed)."""
    return _split(data, source)[0]


class HEContext:
    """A loaded CKKS context: parameters, key id, and the TenSEAL context (``ts_context``)."""

    def __init__(self, info: ContextInfo, ts_context: Any) -> None:
        self.info = info
        self.ts_context = ts_context

    @property
    def params(self) -> HEParams:
        return self.info.params

    @property
    def key_id(self) -> str:
        return self.info.key_id

    @property
    def has_secret_key(self) -> bool:
        return self.info.has_secret_key

    def public_bytes(self) -> bytes:
        """This context without its secret key, serialized (what a server may hold)."""
        body = self.ts_context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return _envelope(ContextInfo(self.params, self.key_id, False), body)

    def __repr__(self) -> str:
        return f"HEContext({self.info.describe()})"


def generate_context(
    poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE,
    coeff_mod_bit_sizes: tuple[int, ...] = DEFAULT_COEFF_MOD_BIT_SIZES,
    global_scale_bits: int = DEFAULT_GLOBAL_SCALE_BITS,
) -> bytes:
    """A new CKKS context with its secret key, serialized (give it to sites only)."""
    params = HEParams.check(poly_modulus_degree, coeff_mod_bit_sizes, global_scale_bits)
    ts = tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=1,
    )
    ctx.global_scale = params.scale
    public = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    key_id = hashlib.sha256(public).hexdigest()[: 2 * KEY_ID_BYTES]
    body = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return _envelope(ContextInfo(params, key_id, True), body)


def public_context(context: bytes) -> bytes:
    """The public form of a serialized context (no secret key): it encrypts, adds ciphertexts
    and multiplies them by plain numbers, and cannot decrypt."""
    return load_context(context, need_secret=False).public_bytes()


def load_context(data: bytes, *, need_secret: bool, source: str = "HE context") -> HEContext:
    """Load a serialized context; ``need_secret`` refuses one that cannot decrypt.

    Errors are one :class:`HEError` line naming ``source`` (garbage, a foreign format, another
    version, parameters that cannot work, a context that does not match its header).
    """
    ts = tenseal()
    info, body = _split(data, source)
    if need_secret and not info.has_secret_key:
        raise HEError(f"{source}: {NO_SECRET}")
    try:
        ctx = ts.context_from(bytes(body), n_threads=1)
    except Exception as exc:  # TenSEAL and SEAL raise ValueError, RuntimeError, TypeError...
        raise HEError(f"{source}: the TenSEAL context does not load ({exc})") from None
    try:
        ok = (
            ctx.has_public_key()
            and ctx.has_secret_key() == info.has_secret_key
            and _matches(ctx, info.params)
            and ctx.global_scale == info.params.scale
        )
    except Exception as exc:
        raise HEError(f"{source}: the TenSEAL context is unusable ({exc})") from None
    if not ok:
        raise HEError(f"{source}: the TenSEAL context does not match its header")
    return HEContext(info, ctx)


def _matches(ctx: Any, params: HEParams) -> bool:
    """Whether a TenSEAL context has ``params``: its degree, and SEAL's modulus chain (the key
    level holds every prime, each level below one fewer; a product of primes of b1, b2, ...
    bits has between Σb - k + 1 and Σb bits)."""
    data = ctx.seal_context().data.key_context_data()
    if data.parms().poly_modulus_degree() != params.poly_modulus_degree:
        return False
    bits = params.coeff_mod_bit_sizes
    for k in range(len(bits), 0, -1):
        if data is None or not sum(bits[:k]) - k < data.total_coeff_modulus_bit_count() <= sum(
            bits[:k]
        ):
            return False
        data = data.next_context_data()
    return data is None
