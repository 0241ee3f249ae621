"""The sealed envelope that carries a party's Shamir shares to one peer through the server.

The key is ``HKDF-SHA256(X25519(c_sk_sender, c_pk_recipient))`` with the session and the
(sender, recipient) pair in ``info`` (one key per direction and session); the envelope is
AES-256-GCM with a random 96-bit nonce, and the session, sender and recipient as associated
data, so the server can neither read it nor pass it off as another pair's or another session's.
The plaintext is a version byte and the two 66-byte share values (of ``s_sk`` and of ``b``).
"""

from __future__ import annotations

import random

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedctl.privacy.secagg.errors import SecAggError
from fedctl.privacy.secagg.masking import encode_fields, exchange, hkdf
from fedctl.privacy.secagg.shamir import VALUE_BYTES, decode_value, encode_value

VERSION = 1
NONCE_BYTES = 12
#: bytes of a sealed envelope: nonce, version, two share values, GCM tag
SEALED_BYTES = NONCE_BYTES + 1 + 2 * VALUE_BYTES + 16


def _key(own: X25519PrivateKey, peer: X25519PublicKey, session: str, sender: str, to: str) -> bytes:
    return hkdf(exchange(own, peer), "fedctl-secagg/v1/share-key", session, sender, to)


def seal(
    own: X25519PrivateKey,
    peer: X25519PublicKey,
    session: str,
    sender: str,
    recipient: str,
    shares: tuple[int, int],
    rng: random.Random,
) -> bytes:
    """The envelope of ``shares`` (``(y of s_sk, y of b)``) from ``sender`` to ``recipient``."""
    key = _key(own, peer, session, sender, recipient)
    nonce = rng.randbytes(NONCE_BYTES)
    plain = bytes([VERSION]) + encode_value(shares[0]) + encode_value(shares[1])
    aad = encode_fields("fedctl-secagg/v1/shares", session, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def open_sealed(
    own: X25519PrivateKey,
    peer: X25519PublicKey,
    session: str,
    sender: str,
    recipient: str,
    sealed: bytes,
) -> tuple[int, int]:
    """The two share values in an envelope, or a :class:`SecAggError` if it was not sealed by
    ``sender`` for ``recipient`` in ``session`` (or was altered)."""
    if len(sealed) != SEALED_BYTES:
        raise SecAggError(f"the shares from {sender} are {len(sealed)} bytes, not {SEALED_BYTES}")
    key = _key(own, peer, session, sender, recipient)
    aad = encode_fields("fedctl-secagg/v1/shares", session, sender, recipient)
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError(
            f"the shares from {sender} do not decrypt for {recipient} (altered, or sealed for "
            "another party or session)"
        ) from None
    if plain[0] != VERSION:
        raise SecAggError(f"the shares from {sender} are of an unknown version {plain[0]}")
    return decode_value(plain[1 : 1 + VALUE_BYTES]), decode_value(plain[1 + VALUE_BYTES :])
