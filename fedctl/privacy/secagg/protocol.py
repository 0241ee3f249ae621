"""One secure-aggregation session as two state machines, :class:`~.client.SecAggClient` (a
site) and :class:`~.server.SecAggServer`; this module holds what both share: the parameters
(:class:`SecAggConfig`), the message kinds and their parsing, the roster. No networking:
each step takes and returns plain messages (dicts of str, int, lists and base64 strings;
the masked input is an int64 tensor), which the caller carries. docs/secagg.md describes
the protocol, its parameters and its threat model.

====================  ======================================  ==================================
round                 server → clients                        client → server
====================  ======================================  ==================================
0 advertise keys                                              ``advertise()``
1 share keys          ``share_keys_request()`` (broadcast)    ``share_keys(request)``
2 masked input        ``masked_input_requests()`` (each own)  ``masked_input(request, values)``
consistency check     ``consistency_request()`` (broadcast)   ``confirm(request)``
3 unmasking           ``unmask_request()`` (broadcast)        ``unmask(request)``
result                ``result()``: the float64 sum of the survivors' inputs
====================  ======================================  ==================================

The server takes the answers with ``receive_*`` and decides when a round is over by asking for
the next request: whoever has not answered by then has dropped out. The consistency check (on
by default) makes the survivors sign the list of survivors before any of them reveals a share,
so a server cannot tell some that a party survived and others that it dropped to collect both
of its secrets; turn it off (``consistency_check=False``) for an honest-but-curious server and
one round trip less.

Sets of parties, in the terms of Bonawitz et al.: the *roster* (U1, advertised keys),
*shared* (U2, sent their shares), *survivors* (U3, sent a masked input: their inputs are in the
sum, even if they vanish afterwards) and *dropped* (U2 ∖ U3: shared, then sent no masked input;
their pairwise masks are removed with their reconstructed mask keys).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from fedctl.privacy.secagg import masking
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.graph import components, neighbourhoods, roster_seed
from fedctl.privacy.secagg.quantize import MAX_BITS, MAX_PARTIES, Quantizer

#: message kinds, in the order of the rounds
ADVERTISE = "secagg/advertise"
SHARE_KEYS = "secagg/share_keys"
SHARES = "secagg/shares"
MASKED_INPUT_REQUEST = "secagg/masked_input_request"
MASKED_INPUT = "secagg/masked_input"
CONSISTENCY = "secagg/consistency"
CONFIRM = "secagg/confirm"
UNMASK = "secagg/unmask"
UNMASK_SHARES = "secagg/unmask_shares"

#: the longest party id and session id
MAX_ID = 255
#: the longest signature accepted (RSA-4096 is 512 bytes; Ed25519 64, ECDSA P-256 about 72)
MAX_SIGNATURE = 1024
KEY_BYTES = 32

#: ``sign(message) -> signature`` with the party's identity key
Signer = Callable[[bytes], bytes]
#: ``verify(party, message, signature) -> True`` iff ``party``'s identity key signed it
Verifier = Callable[[str, bytes, bytes], bool]


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID or not value.isprintable():
        raise SecAggError(f"{what} must be 1-{MAX_ID} printable characters, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class SecAggConfig:
    """The parameters every party of a session must agree on (the server sends its own copy
    in round 1 and clients refuse a different one).

    ``session``: unique per aggregation (e.g. job id and round), bound into every key, seed and
    signature. ``length``: values per input. ``bound`` (B) and ``bits`` (q): values are clipped
    to ``[-B, B]`` and quantized to q bits (see :mod:`.quantize`). ``threshold`` (t): shares
    needed to rebuild a secret; default a majority of a share group. ``neighbours`` (d, even):
    SecAgg+ — each party shares with and masks against d neighbours only; None: everyone.
    ``stochastic_rounding``: unbiased rounding instead of nearest. ``consistency_check``: the
    extra round that stops an active server from equivocating about who survived.
    """

    session: str
    length: int
    bound: float
    bits: int = 24
    threshold: int | None = None
    neighbours: int | None = None
    stochastic_rounding: bool = False
    consistency_check: bool = True

    def __post_init__(self) -> None:
        try:
            _check_id(self.session, "the session id")
        except SecAggError as exc:
            raise SecAggConfigError(str(exc)) from None
        if not _is_int(self.length) or not 1 <= self.length <= masking.MAX_LENGTH:
            raise SecAggConfigError(
                f"length must be in 1..{masking.MAX_LENGTH}, got {self.length!r}"
            )
        Quantizer(self.bound, self.bits, 2)  # validates bound and bits
        if self.threshold is not None and (not _is_int(self.threshold) or self.threshold < 2):
            raise SecAggConfigError(
                f"threshold must be an integer ≥ 2 (one share would be the secret itself), "
                f"got {self.threshold!r}"
            )
        k = self.neighbours
        if k is not None and (not _is_int(k) or k < 2 or k % 2):
            raise SecAggConfigError(f"neighbours must be an even number ≥ 2, got {k!r}")
        if self.threshold is not None and k is not None and self.threshold > k + 1:
            raise SecAggConfigError(
                f"threshold {self.threshold} is more than a share group holds ({k} neighbours "
                "and the party itself)"
            )
        for name in ("stochastic_rounding", "consistency_check"):
            if not isinstance(getattr(self, name), bool):
                raise SecAggConfigError(f"{name} must be true or false")

    def public(self) -> dict[str, Any]:
        """The parameters as a JSON-able dict (what the share-keys request carries)."""
        return asdict(self)

    def group_size(self, n: int) -> int:
        """Parties that hold shares of one party's secrets (its neighbours and itself)."""
        return n if self.neighbours is None or self.neighbours >= n - 1 else self.neighbours + 1

    def threshold_for(self, n: int) -> int:
        """t for a roster of ``n`` parties."""
        return self.threshold if self.threshold is not None else self.group_size(n) // 2 + 1

    def quantizer(self, n: int) -> Quantizer:
        """The quantizer for a roster of ``n`` parties (its modulus depends on n)."""
        return Quantizer(self.bound, self.bits, n)


def count(n: int, one: str, many: str) -> str:
    """``n`` with the noun in the number it needs (for messages)."""
    return f"{n} {one if n == 1 else many}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def suggested_bits(parties: int, bound: float, error: float) -> int:
    """The fewest bits per value (q) for which the sum of ``parties`` values within
    ``[-bound, bound]`` is within ``error`` of the true sum (rounding to nearest)."""
    if not (_is_int(parties) and parties >= 1 and bound > 0 and error > 0):
        raise SecAggConfigError("suggested_bits needs parties ≥ 1, bound > 0 and error > 0")
    bits = max(1, math.ceil(math.log2(parties * bound / error + 1)))
    if bits > MAX_BITS:
        raise SecAggConfigError(f"an error of {error:g} needs {bits} bits, more than {MAX_BITS}")
    return bits


# ------------------------------------------------------------------------- message helpers


def b64(data: bytes) -> str:
    """Bytes as a base64 string (how every binary field travels)."""
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str, size: int | None = None, most: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * ((most or size or 0) + 2) // 3 + 4:
        raise SecAggError(f"{what} must be a base64 string of {size or most} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SecAggError(f"{what} is not base64") from None
    if (size is not None and len(raw) != size) or (most is not None and not raw):
        raise SecAggError(f"{what} is {len(raw)} bytes, not {size or f'1..{most}'}")
    return raw


def _fields(msg: Any, kind: str, session: str, keys: set[str], where: str) -> Mapping[str, Any]:
    """``msg`` if it is a ``kind`` message of ``session`` with exactly ``keys``."""
    if not isinstance(msg, Mapping):
        raise SecAggError(f"{where}: a message is a mapping, got {type(msg).__name__}")
    if msg.get("kind") != kind:
        raise SecAggError(f"{where}: expected a {kind!r} message, got {msg.get('kind')!r:.60}")
    if msg.get("session") != session:
        raise SecAggError(
            f"{where}: the message is for session {msg.get('session')!r:.80}, not {session!r}"
        )
    want = keys | {"kind", "session"}
    if set(msg) != want:
        extra, missing = sorted(map(str, set(msg) - want)), sorted(want - set(msg))
        raise SecAggError(f"{where}: unexpected fields {extra} / missing fields {missing}")
    return msg


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or len(value) > MAX_PARTIES:
        raise SecAggError(f"{what} must be a mapping of at most {MAX_PARTIES} parties")
    for key in value:
        _check_id(key, f"a party in {what}")
    return value


def _party_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list | tuple) or len(value) > MAX_PARTIES:
        raise SecAggError(f"{what} must be a list of at most {MAX_PARTIES} parties")
    parties = [_check_id(p, f"a party in {what}") for p in value]
    if len(set(parties)) != len(parties):
        raise SecAggError(f"{what} names a party twice")
    return sorted(parties)


def advertisement_bytes(session: str, party: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a party signs in round 0: its two public keys, bound to its id and the session."""
    return masking.encode_fields("fedctl-secagg/v1/advertise", session, party, c_pk, s_pk)


def survivors_bytes(session: str, survivors: list[str]) -> bytes:
    """What a survivor signs in the consistency check: the sorted list of survivors."""
    return masking.encode_fields("fedctl-secagg/v1/survivors", session, *sorted(survivors))


def _signature(value: Any, what: str) -> bytes:
    return _unb64(value, what, most=MAX_SIGNATURE)


@dataclass(frozen=True)
class _Entry:
    """One party's round-0 advertisement."""

    party: str
    c_pk: bytes
    s_pk: bytes
    sig: bytes

    @classmethod
    def parse(cls, msg: Mapping[str, Any], what: str) -> _Entry:
        party = _check_id(msg["party"], f"{what}: the party")
        c_pk = _unb64(msg["c_pk"], f"{what}: {party}'s c_pk", KEY_BYTES)
        s_pk = _unb64(msg["s_pk"], f"{what}: {party}'s s_pk", KEY_BYTES)
        return cls(party, c_pk, s_pk, _signature(msg["sig"], f"{what}: {party}'s signature"))

    def public(self) -> dict[str, str]:
        return {
            "party": self.party,
            "c_pk": b64(self.c_pk),
            "s_pk": b64(self.s_pk),
            "sig": b64(self.sig),
        }

    def signed_bytes(self, session: str) -> bytes:
        return advertisement_bytes(session, self.party, self.c_pk, self.s_pk)


class _Roster:
    """The agreed parties: their keys, share points (x = index + 1) and neighbourhoods."""

    def __init__(self, config: SecAggConfig, entries: list[_Entry]) -> None:
        self.entries = {e.party: e for e in sorted(entries, key=lambda e: e.party)}
        self.parties = list(self.entries)
        self.n = len(self.parties)
        self.t = config.threshold_for(self.n)
        if self.n < max(self.t, 2):
            raise SecAggError(
                f"round 0: {count(self.n, 'party', 'parties')} advertised keys, "
                f"{max(self.t, 2)} are required "
                f"(the threshold t = {self.t}, and at least 2)"
            )
        self.x = {p: i + 1 for i, p in enumerate(self.parties)}
        seed = roster_seed(config.session, [(e.party, e.c_pk, e.s_pk) for e in entries])
        self.neighbours = neighbourhoods(self.parties, config.neighbours, seed)
        self.complete = config.group_size(self.n) == self.n
        self.quantizer = config.quantizer(self.n)
        self.bits = self.quantizer.modulus_bits

    def group(self, party: str) -> frozenset[str]:
        """The parties holding shares of ``party``'s secrets (its neighbours and itself)."""
        return self.neighbours[party] | {party}

    def c_pk(self, party: str) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.entries[party].c_pk)

    def s_pk(self, party: str) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.entries[party].s_pk)

    def split(self, survivors: list[str], where: str) -> None:
        """Refuse survivors whose masks do not join them into one group: the server could
        unmask the sum of each group on its own (only possible with neighbourhoods)."""
        if self.complete:  # everyone masks against everyone: one group, always
            return
        parts = components(self.neighbours, survivors)
        if len(parts) > 1:
            raise SecAggError(
                f"{where}: the {len(survivors)} survivors fall into {len(parts)} groups that "
                f"share no masks (sizes {', '.join(str(len(c)) for c in parts)}): the sum of "
                "each would be revealed on its own; refused"
            )

    def known(self, parties: list[str], what: str) -> list[str]:
        unknown = [p for p in parties if p not in self.entries]
        if unknown:
            raise SecAggError(f"{what} names {unknown[0]!r:.80}, who is not in the roster")
        return parties
