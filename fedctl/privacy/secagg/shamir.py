"""Shamir secret sharing of short byte strings over the prime field of ``2**521 - 1``.

A secret of up to 64 bytes is read as the integer of ``0x01 || secret`` (the marker byte keeps
leading zero bytes and tells a real secret from the garbage that inconsistent shares give),
which is below ``2**520`` and so below the Mersenne prime ``P = 2**521 - 1``. :func:`split`
draws a random polynomial of degree ``t - 1`` with that integer as its constant term and gives
its values at ``x = 1..n`` (or at chosen ``xs`` in that range); :func:`combine` interpolates
any ``t`` of them at zero (Lagrange). Fewer than ``t`` shares say nothing about the secret:
every secret of the same length is equally likely given them.

The coefficients come from ``secrets.SystemRandom()`` unless a ``random.Random`` is passed
(tests pass a seeded one to be reproducible). Share values are encoded as 66 big-endian bytes
(:func:`encode_value`).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Sequence

from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError

#: the field: the Mersenne prime 2**521 - 1
PRIME = 2**521 - 1
#: the longest secret (bytes): 65 bytes with the marker stay below 2**520 < PRIME
MAX_SECRET = 64
#: share points are x = 1..n with n at most this (ids fit in 16 bits in every encoding)
MAX_SHARES = 65_535
#: bytes of an encoded share value (521 bits)
VALUE_BYTES = 66

Share = tuple[int, int]


def _int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggConfigError(f"Shamir: {name} must be an integer, got {value!r}")
    return value


def split(
    secret: bytes,
    n: int,
    t: int,
    rng: random.Random | None = None,
    *,
    xs: Sequence[int] | None = None,
) -> list[Share]:
    """``t``-of-``n`` shares ``(x, y)`` of ``secret``, at ``x = 1..n`` or at the given ``xs``
    (distinct, each in ``1..n``: the points of the parties that will hold them)."""
    if not isinstance(secret, bytes | bytearray):
        raise SecAggConfigError(f"Shamir: the secret must be bytes, got {type(secret).__name__}")
    if len(secret) > MAX_SECRET:
        raise SecAggConfigError(
            f"Shamir: a secret of {len(secret)} bytes is over the {MAX_SECRET}-byte limit"
        )
    n, t = _int("n", n), _int("t", t)
    if not 1 <= n <= MAX_SHARES:
        raise SecAggConfigError(f"Shamir: n must be in 1..{MAX_SHARES}, got {n}")
    if not 1 <= t <= n:
        raise SecAggConfigError(f"Shamir: the threshold t must be in 1..n = {n}, got {t}")
    points = list(range(1, n + 1)) if xs is None else [_int("x", x) for x in xs]
    _check_points(points, n)
    rng = rng or secrets.SystemRandom()
    coefficients = [int.from_bytes(b"\x01" + bytes(secret), "big")]
    coefficients += [rng.randrange(PRIME) for _ in range(t - 1)]
    shares = []
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Iterable[Share], t: int) -> bytes:
    """The secret from at least ``t`` shares (the ``t`` with the smallest ``x`` are used).

    Raises :class:`SecAggError` for fewer than ``t`` shares, and when the shares do not
    interpolate to a well-formed secret: a share replaced by garbage is caught with
    probability about 255/256. This is not an integrity check: a share changed on purpose
    (``y + 1`` shifts the secret by a small multiple) can give a well-formed wrong secret."""
    t = _int("t", t)
    if t < 1:
        raise SecAggConfigError(f"Shamir: the threshold t must be at least 1, got {t}")
    points: list[Share] = []
    for share in shares:
        if not (isinstance(share, tuple) and len(share) == 2):
            raise SecAggConfigError(f"Shamir: a share is a pair (x, y), got {share!r:.60}")
        x, y = _int("x", share[0]), _int("y", share[1])
        if not 0 <= y < PRIME:
            raise SecAggConfigError("Shamir: a share's value is outside the field")
        points.append((x, y))
    _check_points([x for x, _ in points], MAX_SHARES)
    if len(points) < t:
        raise SecAggError(f"Shamir: {len(points)} of the {t} required shares")
    points = sorted(points)[:t]
    xs = [x for x, _ in points]
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) > MAX_SECRET + 1:
        raise SecAggError("Shamir: the shares do not combine to a secret (inconsistent shares)")
    return raw[1:]


def _check_points(xs: list[int], n: int) -> None:
    seen: set[int] = set()
    for x in xs:
        if not 1 <= x <= n:
            raise SecAggConfigError(f"Shamir: share point x = {x} is outside 1..{n}")
        if x in seen:
            raise SecAggConfigError(f"Shamir: share point x = {x} appears twice")
        seen.add(x)


def encode_value(y: int) -> bytes:
    """A share's value as :data:`VALUE_BYTES` big-endian bytes."""
    if not 0 <= y < PRIME:
        raise SecAggConfigError("Shamir: a share's value is outside the field")
    return y.to_bytes(VALUE_BYTES, "big")


def decode_value(data: bytes) -> int:
    """The share value encoded by :func:`encode_value` (refuses other lengths and values)."""
    if len(data) != VALUE_BYTES:
        raise SecAggError(f"Shamir: a share value is {VALUE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise SecAggError("Shamir: a share's value is outside the field")
    return y
