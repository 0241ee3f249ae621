"""CKKS parameters for fedctl's homomorphic encryption: what is allowed, and what follows.

Only additions happen under encryption (the server sums ciphertexts; the divisor Σw travels in
plain), so no multiplicative depth is needed: the coefficient modulus is data primes (all but
the last, which SEAL keeps as its special prime for key switching) wide enough to hold
``scale · Σ|w·x|`` without wrapping. Security follows the HomomorphicEncryption.org standard
for 128-bit classical security with a ternary secret (SEAL's ``CoeffModulus::MaxBitCount``):
the total modulus may not exceed :data:`MAX_MODULUS_BITS` for the polynomial degree.

Nothing here imports TenSEAL; :func:`tenseal` does, with the one-line error when it is absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedctl.errors import FedctlError, UsageError

#: the message every entry point gives without TenSEAL
MISSING_TENSEAL = "homomorphic encryption needs TenSEAL: pip install 'fedctl[he]'"

#: polynomial degree → the most coefficient-modulus bits for 128-bit security (HE standard)
MAX_MODULUS_BITS: Mapping[int, int] = {8192: 218, 16384: 438, 32768: 881}
#: SEAL's primes are at most 60 bits; below 20 bits no NTT-friendly prime exists for N ≥ 8192
PRIME_BITS = (20, 60)
#: the scale: below 30 bits a value is off by more than 1e-3; SEAL caps it at 60
SCALE_BITS = (30, 60)
#: bits the data modulus must have beyond the scale (room for weighted sums of many sites)
MIN_HEADROOM_BITS = 40
#: sums of up to 2**SITE_BITS sites never wrap when each site stays within its bound
SITE_BITS = 16
#: standard deviation of SEAL's error distribution
NOISE_SIGMA = 3.2

DEFAULT_POLY_MODULUS_DEGREE = 8192
DEFAULT_COEFF_MOD_BIT_SIZES = (60, 40, 60)
DEFAULT_GLOBAL_SCALE_BITS = 40


class HEError(FedctlError):
    """Homomorphic-encryption data that cannot be used: a context or ciphertext that does not
    load, was made under another key, or does not match its description. One line, naming the
    parameter (tensor) concerned."""


class HEConfigError(HEError, UsageError):
    """CKKS parameters that cannot work; ``field`` names the offending parameter."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.problem, self.field = problem, field


def tenseal() -> Any:
    """The ``tenseal`` module, or the one-line UsageError saying how to install it."""
    try:
        import tenseal as ts
    except ImportError:
        raise UsageError(MISSING_TENSEAL) from None
    return ts


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HEConfigError(f"must be an integer, got {value!r}", field)
    return value


@dataclass(frozen=True)
class HEParams:
    """Validated CKKS parameters (see the module docstring); build with :meth:`check`."""

    poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE
    coeff_mod_bit_sizes: tuple[int, ...] = DEFAULT_COEFF_MOD_BIT_SIZES
    global_scale_bits: int = DEFAULT_GLOBAL_SCALE_BITS

    @classmethod
    def check(
        cls,
        poly_modulus_degree: Any = DEFAULT_POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes: Any = DEFAULT_COEFF_MOD_BIT_SIZES,
        global_scale_bits: Any = DEFAULT_GLOBAL_SCALE_BITS,
    ) -> HEParams:
        """The parameters if they are secure and can sum weighted updates; else HEConfigError."""
        n = _int(poly_modulus_degree, "poly_modulus_degree")
        if n not in MAX_MODULUS_BITS:
            raise HEConfigError(
                f"must be one of {', '.join(map(str, MAX_MODULUS_BITS))}, got {n} (smaller "
                "degrees allow too few modulus bits for 128-bit security and a useful scale)",
                "poly_modulus_degree",
            )
        if isinstance(coeff_mod_bit_sizes, str | bytes) or not isinstance(
            coeff_mod_bit_sizes, Sequence
        ):
            raise HEConfigError(
                f"must be a list of prime sizes in bits, got {coeff_mod_bit_sizes!r}",
                "coeff_mod_bit_sizes",
            )
        bits = tuple(
            _int(b, f"coeff_mod_bit_sizes[{i}]") for i, b in enumerate(coeff_mod_bit_sizes)
        )
        if not 2 <= len(bits) <= 32:
            raise HEConfigError(
                "needs 2 to 32 primes (the data primes, then SEAL's special prime), "
                f"got {len(bits)}",
                "coeff_mod_bit_sizes",
            )
        lo, hi = PRIME_BITS
        for i, b in enumerate(bits):
            if not lo <= b <= hi:
                raise HEConfigError(f"must be {lo}-{hi} bits, got {b}", f"coeff_mod_bit_sizes[{i}]")
        limit = MAX_MODULUS_BITS[n]
        if sum(bits) > limit:
            raise HEConfigError(
                f"total {sum(bits)} bits is more than the {limit} bits that keep "
                f"poly_modulus_degree {n} at 128-bit security",
                "coeff_mod_bit_sizes",
            )
        scale = _int(global_scale_bits, "global_scale_bits")
        lo, hi = SCALE_BITS
        if not lo <= scale <= hi:
            raise HEConfigError(f"must be {lo}-{hi}, got {scale}", "global_scale_bits")
        data = sum(bits[:-1])
        if data - scale < MIN_HEADROOM_BITS:
            raise HEConfigError(
                f"the data primes ({' + '.join(map(str, bits[:-1]))} = {data} bits; the last "
                f"prime is SEAL's special prime) leave {data - scale} bits above the "
                f"{scale}-bit scale; sums of weighted updates need at least {MIN_HEADROOM_BITS}",
                "coeff_mod_bit_sizes",
            )
        return cls(n, bits, scale)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> HEParams:
        """Parameters from a project.yml-style mapping (missing keys take the defaults)."""
        unknown = sorted(
            set(spec) - {"poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits"}
        )
        if unknown:
            raise HEConfigError(
                "unknown key (expected poly_modulus_degree, coeff_mod_bit_sizes, "
                "global_scale_bits)",
                str(unknown[0]),
            )
        return cls.check(**dict(spec))

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.global_scale_bits,
        }

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.global_scale_bits)

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext (and the aggregate) is kept under."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_site_value(self) -> float:
        """The largest |weight × value| one site may encrypt: 2**SITE_BITS such contributions
        sum to less than half the data modulus at this scale, so no honest sum wraps."""
        return float(2 ** (self.data_bits - self.global_scale_bits - 1 - SITE_BITS))

    def count(self, numel: int) -> int:
        """Ciphertexts needed for ``numel`` values."""
        return -(-numel // self.slots)

    @property
    def max_ciphertext_bytes(self) -> int:
        """An upper bound on one serialized ciphertext: two polynomials of 8-byte coefficients
        per data prime, zstd's worst-case growth (under 1%) and SEAL's header."""
        raw = 2 * self.poly_modulus_degree * (len(self.coeff_mod_bit_sizes) - 1) * 8
        return raw + raw // 100 + 4096

    @property
    def max_context_bytes(self) -> int:
        """An upper bound on a serialized context (public and secret key, no evaluation keys)."""
        return 4 * self.poly_modulus_degree * len(self.coeff_mod_bit_sizes) * 8 + 65536

    @property
    def error_bound(self) -> float:
        """A bound on the error of one value of a fresh encryption.

        The fresh-encryption noise bound of Cheon, Kim, Kim and Song (2017, Lemma 1),
        ``8√2·σN + 6σ√N + 16σ√(hN)`` with the secret's Hamming weight ``h ≤ N``, plus the
        encoding's rounding (``N/2``), over the scale. SEAL encrypts one level up and divides
        by the special prime, so the errors seen in practice are some 50× smaller.
        """
        n, s = self.poly_modulus_degree, NOISE_SIGMA
        noise = 8 * math.sqrt(2) * s * n + 6 * s * math.sqrt(n) + 16 * s * n + n / 2
        return noise / self.scale

    def describe(self) -> str:
        bits = ", ".join(map(str, self.coeff_mod_bit_sizes))
        return (
            f"CKKS N={self.poly_modulus_degree}, primes [{bits}], scale 2^{self.global_scale_bits}"
        )
