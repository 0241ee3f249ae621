"""One secure-aggregation session as two state machines: :class:`SecAggClient` (a site) and
:class:`SecAggServer`. No networking: each step takes and returns plain messages (dicts of
str, int, lists and base64 strings; the masked input is an int64 tensor), which the caller
carries. docs/secagg.md describes the protocol, its parameters and its threat model.

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
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedctl.privacy.secagg import channel, masking, shamir
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
                f"round 0: {self.n} parties advertised keys, {max(self.t, 2)} are required "
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


# ------------------------------------------------------------------------------- the client


class SecAggClient:
    """One party (site) of one session. Call the steps in order; each refuses to run out of
    turn, and a refusal (a :class:`SecAggError`) means this party stops: the server will see
    it as dropped.

    ``sign`` signs with the party's identity key; ``verify(peer, message, signature)`` checks a
    peer's (both come from the deployment's PKI: the server holds no identity key, so it cannot
    advertise keys in a site's name). ``rng``: a ``random.Random`` for reproducible tests; by
    default ``secrets.SystemRandom()``.
    """

    def __init__(
        self,
        party: str,
        config: SecAggConfig,
        sign: Signer,
        verify: Verifier,
        rng: random.Random | None = None,
    ) -> None:
        self.party = _check_id(party, "the party id")
        if not isinstance(config, SecAggConfig):
            raise SecAggConfigError("config must be a SecAggConfig")
        self.config = config
        self._sign = sign
        self._verify = verify
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._state = "new"
        self._c_sk: X25519PrivateKey | None = None
        self._s_sk: X25519PrivateKey | None = None
        self._roster: _Roster | None = None
        self._b = b""
        self._own: tuple[int, int] = (0, 0)
        self._inbound: dict[str, bytes] = {}
        self._confirmed: list[str] | None = None

    @property
    def state(self) -> str:
        """``new``, ``advertised``, ``shared``, ``masked``, ``confirmed`` or ``done``."""
        return self._state

    def _turn(self, expected: str, where: str) -> None:
        if self._state != expected:
            raise SecAggError(f"{where}: out of turn (this party is at {self._state!r})")

    def _keys(self) -> tuple[X25519PrivateKey, X25519PrivateKey, _Roster]:
        assert self._c_sk and self._s_sk and self._roster
        return self._c_sk, self._s_sk, self._roster

    def advertise(self) -> dict[str, Any]:
        """Round 0: new encryption (c) and mask (s) key pairs; their public keys, signed.

        Returns ``{"kind": "secagg/advertise", "session", "party", "c_pk", "s_pk", "sig"}``
        (keys: 32 raw bytes, base64)."""
        self._turn("new", "round 0")
        c_sk = X25519PrivateKey.from_private_bytes(self._rng.randbytes(KEY_BYTES))
        s_sk = X25519PrivateKey.from_private_bytes(self._rng.randbytes(KEY_BYTES))
        c_pk, s_pk = c_sk.public_key().public_bytes_raw(), s_sk.public_key().public_bytes_raw()
        sig = self._sign(advertisement_bytes(self.config.session, self.party, c_pk, s_pk))
        if not isinstance(sig, bytes) or not 0 < len(sig) <= MAX_SIGNATURE:
            raise SecAggError(f"round 0: sign() must return 1-{MAX_SIGNATURE} bytes")
        self._c_sk, self._s_sk, self._state = c_sk, s_sk, "advertised"
        return {
            "kind": ADVERTISE,
            "session": self.config.session,
            "party": self.party,
            "c_pk": b64(c_pk),
            "s_pk": b64(s_pk),
            "sig": b64(sig),
        }

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Round 1: check the roster (the neighbours' signatures, this party's own keys, the
        parameters),
        split ``s_sk`` and the self-mask seed ``b`` into t-of-n shares over the share group and
        seal each neighbour's pair of shares for it.

        ``request``: ``{"kind": "secagg/share_keys", "session", "config": {...},
        "roster": [{"party", "c_pk", "s_pk", "sig"}, ...]}``. Returns ``{"kind":
        "secagg/shares", "session", "party", "shares": {neighbour: sealed (base64)}}``.
        """
        where = "round 1"
        self._turn("advertised", where)
        c_sk, s_sk = self._c_sk, self._s_sk
        assert c_sk and s_sk
        msg = _fields(request, SHARE_KEYS, self.config.session, {"config", "roster"}, where)
        theirs, mine = msg["config"], self.config.public()
        if theirs != mine:
            diff = sorted(
                k for k in mine if not isinstance(theirs, Mapping) or theirs.get(k) != mine[k]
            )
            raise SecAggError(
                f"{where}: the server's parameters differ from this party's ({', '.join(diff)})"
                if diff
                else f"{where}: the server's parameters carry unknown settings"
            )
        raw = msg["roster"]
        if not isinstance(raw, list) or len(raw) > MAX_PARTIES:
            raise SecAggError(f"{where}: the roster must be a list of at most {MAX_PARTIES}")
        entries = []
        for item in raw:
            if not isinstance(item, Mapping) or set(item) != {"party", "c_pk", "s_pk", "sig"}:
                raise SecAggError(f"{where}: a roster entry is {{party, c_pk, s_pk, sig}}")
            entries.append(_Entry.parse(item, f"{where}: the roster"))
        if len({e.party for e in entries}) != len(entries):
            raise SecAggError(f"{where}: the roster names a party twice")
        own = next((e for e in entries if e.party == self.party), None)
        if own is None:
            raise SecAggError(f"{where}: this party ({self.party}) is not in the roster")
        if (own.c_pk, own.s_pk) != (
            c_sk.public_key().public_bytes_raw(),
            s_sk.public_key().public_bytes_raw(),
        ):
            raise SecAggError(
                f"{where}: the roster carries other keys for this party (substituted)"
            )
        roster = _Roster(self.config, entries)
        # the entries this party relies on are its neighbours' (everyone's, without
        # neighbourhoods): it shares with, masks against and reveals shares of them only
        for p in sorted(roster.neighbours[self.party]):
            e = roster.entries[p]
            if self._verify(p, e.signed_bytes(self.config.session), e.sig) is not True:
                raise SecAggError(
                    f"{where}: the keys advertised for {p} are not signed by {p} "
                    "(forged or substituted): refused"
                )
        group = sorted(roster.group(self.party))
        xs = [roster.x[p] for p in group]
        b = self._rng.randbytes(masking.SEED_BYTES)
        s_shares = shamir.split(s_sk.private_bytes_raw(), roster.n, roster.t, self._rng, xs=xs)
        b_shares = shamir.split(b, roster.n, roster.t, self._rng, xs=xs)
        sealed = {}
        for p, (_, ys), (_, yb) in zip(group, s_shares, b_shares, strict=True):
            if p == self.party:
                self._own = (ys, yb)
                continue
            envelope = channel.seal(
                c_sk, roster.c_pk(p), self.config.session, self.party, p, (ys, yb), self._rng
            )
            sealed[p] = b64(envelope)
        self._roster, self._b, self._state = roster, b, "shared"
        return {
            "kind": SHARES,
            "session": self.config.session,
            "party": self.party,
            "shares": sealed,
        }

    def masked_input(self, request: Mapping[str, Any], values: torch.Tensor) -> dict[str, Any]:
        """Round 2: keep the sealed shares addressed to this party (at least t - 1 neighbours
        must have shared), and mask the quantized ``values`` (``config.length`` floats, any
        shape) with the self-mask and a pairwise mask for each of those neighbours.

        ``request``: ``{"kind": "secagg/masked_input_request", "session", "shares": {sender:
        sealed}}``. Returns ``{"kind": "secagg/masked_input", "session", "party", "masked":
        int64 tensor of config.length values in [0, 2**k)}``.
        """
        where = "round 2"
        self._turn("shared", where)
        _, s_sk, roster = self._keys()
        msg = _fields(request, MASKED_INPUT_REQUEST, self.config.session, {"shares"}, where)
        inbound = _mapping(msg["shares"], f"{where}: the shares")
        mine = roster.neighbours[self.party]
        sealed = {}
        for sender, value in inbound.items():
            if sender not in mine:
                raise SecAggError(f"{where}: shares from {sender!r:.80}, who is not a neighbour")
            sealed[sender] = _unb64(
                value, f"{where}: the shares from {sender}", channel.SEALED_BYTES
            )
        if len(sealed) + 1 < roster.t:
            raise SecAggError(
                f"{where}: {len(sealed) + 1} of the {roster.t} required parties of this party's "
                "share group took part in round 1 (itself included)"
            )
        if not isinstance(values, torch.Tensor) or values.numel() != self.config.length:
            got = values.numel() if isinstance(values, torch.Tensor) else type(values).__name__
            raise SecAggError(
                f"{where}: the input must be a tensor of {self.config.length} values, got {got}"
            )
        generator = None
        if self.config.stochastic_rounding:
            generator = torch.Generator().manual_seed(self._rng.getrandbits(63))
        quantized = roster.quantizer.quantize(values, generator)
        seeds = {
            v: masking.pair_seed(s_sk, roster.s_pk(v), self.config.session, self.party, v)
            for v in sorted(sealed)
        }
        masked = masking.mask(quantized, self._b, seeds, self.party, roster.bits)
        self._inbound, self._state = sealed, "masked"
        return {
            "kind": MASKED_INPUT,
            "session": self.config.session,
            "party": self.party,
            "masked": masked,
        }

    def _survivors(self, value: Any, where: str) -> list[str]:
        assert self._roster
        survivors = self._roster.known(_party_list(value, f"{where}: survivors"), where)
        if self.party not in survivors:
            raise SecAggError(f"{where}: this party ({self.party}) is not among the survivors")
        if len(survivors) < self._roster.t:
            raise SecAggError(
                f"{where}: {len(survivors)} survivors, fewer than the threshold "
                f"{self._roster.t}: refused (the sum of so few inputs would reveal too much)"
            )
        self._roster.split(survivors, where)
        return survivors

    def confirm(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Consistency check: sign the list of survivors the server announces.

        ``request``: ``{"kind": "secagg/consistency", "session", "survivors": [...]}``.
        Returns ``{"kind": "secagg/confirm", "session", "party", "sig"}``."""
        where = "consistency check"
        if not self.config.consistency_check:
            raise SecAggError(f"{where}: this session has no consistency check")
        self._turn("masked", where)
        msg = _fields(request, CONSISTENCY, self.config.session, {"survivors"}, where)
        survivors = self._survivors(msg["survivors"], where)
        sig = self._sign(survivors_bytes(self.config.session, survivors))
        if not isinstance(sig, bytes) or not 0 < len(sig) <= MAX_SIGNATURE:
            raise SecAggError(f"{where}: sign() must return 1-{MAX_SIGNATURE} bytes")
        self._confirmed, self._state = survivors, "confirmed"
        return {
            "kind": CONFIRM,
            "session": self.config.session,
            "party": self.party,
            "sig": b64(sig),
        }

    def _check_signatures(
        self, signatures: Mapping[str, Any], survivors: list[str], dropped: list[str], where: str
    ) -> None:
        """Before a share of party v leaves, t parties of v's share group (the holders of its
        shares) must have signed this list of survivors: holders shown different lists cannot
        then be split into two groups that each reveal t shares of one kind."""
        roster = self._roster
        assert roster
        signed = survivors_bytes(self.config.session, survivors)
        checked: dict[str, bool] = {}  # each signature is verified once, and only if needed

        def valid(p: str) -> bool:
            if p not in checked:
                sig = _signature(signatures[p], f"{where}: {p}'s signature")
                checked[p] = self._verify(p, signed, sig) is True
            return checked[p]

        signers = set(signatures) & set(survivors)
        for v in sorted((self._inbound.keys() | {self.party}) & {*survivors, *dropped}):
            count = 0
            for p in sorted(roster.group(v) & signers):
                if count >= roster.t:
                    break
                count += valid(p)
            if count < roster.t:
                raise SecAggError(
                    f"{where}: {count} of the {roster.t} required signatures on the list of "
                    f"survivors from {v}'s share group: refused"
                )

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Round 3: reveal, for each party of this party's share group, the share of its
        self-mask seed if it survived or of its mask key if it dropped — never both.

        ``request``: ``{"kind": "secagg/unmask", "session", "survivors": [...], "dropped":
        [...], "signatures": {survivor: sig}}`` (signatures: the consistency check's, over
        the same survivors; empty without the check). Returns ``{"kind":
        "secagg/unmask_shares", "session", "party", "b_shares": {survivor: value},
        "s_shares": {dropped: value}}`` (values: 66 bytes, base64). With the consistency check,
        a share of party v is revealed only if t parties of v's share group signed the list.
        """
        where = "round 3"
        self._turn("confirmed" if self.config.consistency_check else "masked", where)
        c_sk, _, roster = self._keys()
        session = self.config.session
        keys = {"survivors", "dropped", "signatures"}
        msg = _fields(request, UNMASK, session, keys, where)
        survivors = self._survivors(msg["survivors"], where)
        dropped = roster.known(_party_list(msg["dropped"], f"{where}: dropped"), where)
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise SecAggError(
                f"{where}: the server asks for both kinds of share of {both[0]} (listed as "
                "survived and as dropped): refused"
            )
        missing = sorted(set(self._inbound) - set(survivors) - set(dropped))
        if missing:
            raise SecAggError(
                f"{where}: {missing[0]}, whose mask is in this party's input, is "
                "listed neither as survived nor as dropped"
            )
        signatures = _mapping(msg["signatures"], f"{where}: signatures")
        if self.config.consistency_check:
            if survivors != self._confirmed:
                raise SecAggError(
                    f"{where}: the survivors differ from those this party confirmed: refused"
                )
            self._check_signatures(signatures, survivors, dropped, where)
        elif signatures:
            raise SecAggError(f"{where}: signatures in a session without a consistency check")
        b_shares, s_shares = {}, {}
        for v in sorted(self._inbound.keys() | {self.party}):
            if v in dropped or v in survivors:
                if v == self.party:
                    ys, yb = self._own
                else:
                    ys, yb = channel.open_sealed(
                        c_sk, roster.c_pk(v), session, v, self.party, self._inbound[v]
                    )
                if v in survivors:
                    b_shares[v] = b64(shamir.encode_value(yb))
                else:
                    s_shares[v] = b64(shamir.encode_value(ys))
        self._state = "done"
        return {
            "kind": UNMASK_SHARES,
            "session": session,
            "party": self.party,
            "b_shares": b_shares,
            "s_shares": s_shares,
        }


# ------------------------------------------------------------------------------- the server


class SecAggServer:
    """The server's side of one session: collects, routes, and finally unmasks the sum.

    It never holds an identity key; ``verify`` (optional) lets it drop forged advertisements
    and confirmations early instead of letting every client refuse them. Each ``receive_*``
    refuses (a :class:`SecAggError`, nothing stored) a message out of turn, from a party
    outside the round's set, a second one from the same party, or a malformed one; the caller
    logs it and carries on. Asking for the next round's request closes the current round.
    """

    def __init__(self, config: SecAggConfig, verify: Verifier | None = None) -> None:
        if not isinstance(config, SecAggConfig):
            raise SecAggConfigError("config must be a SecAggConfig")
        self.config = config
        self._verify = verify
        self._state = "advertise"
        self._ads: dict[str, _Entry] = {}
        self._roster: _Roster | None = None
        self._sealed: dict[str, dict[str, bytes]] = {}  # sender → recipient → envelope
        self._total: torch.Tensor | None = None
        self._survivors: list[str] = []
        self._dropped: list[str] = []
        self._masked: set[str] = set()
        self._confirmations: dict[str, bytes] = {}
        self._b_shares: dict[str, list[tuple[int, int]]] = {}
        self._s_shares: dict[str, list[tuple[int, int]]] = {}
        self._answered: set[str] = set()

    @property
    def state(self) -> str:
        """``advertise``, ``shares``, ``masked``, ``confirm``, ``unmask`` or ``done``."""
        return self._state

    @property
    def roster(self) -> list[str]:
        """The parties that advertised keys (U1), once round 0 is closed."""
        return self._roster.parties if self._roster else []

    @property
    def threshold(self) -> int | None:
        return self._roster.t if self._roster else None

    @property
    def shared(self) -> list[str]:
        """The parties that sent their shares (U2)."""
        return sorted(self._sealed)

    @property
    def survivors(self) -> list[str]:
        """The parties whose masked inputs are in the sum (U3), once round 2 is closed."""
        return list(self._survivors)

    @property
    def dropped(self) -> list[str]:
        """The parties that shared and sent no masked input (U2 ∖ U3)."""
        return list(self._dropped)

    @property
    def pending(self) -> list[str]:
        """Who the current round is still waiting for."""
        if self._state == "shares":
            return [p for p in self.roster if p not in self._sealed]
        if self._state == "masked":
            return [p for p in self.shared if p not in self._masked]
        if self._state == "confirm":
            return [p for p in self._survivors if p not in self._confirmations]
        if self._state == "unmask":
            return [p for p in self._survivors if p not in self._answered]
        return []

    def _turn(self, expected: str, where: str) -> _Roster:
        if self._state != expected:
            raise SecAggError(f"{where}: out of turn (the session is at {self._state!r})")
        assert self._roster or expected == "advertise"
        return self._roster  # type: ignore[return-value]

    # round 0

    def receive_advertisement(self, msg: Mapping[str, Any]) -> None:
        """Round 0: a party's signed public keys (see :meth:`SecAggClient.advertise`)."""
        where = "round 0"
        self._turn("advertise", where)
        _fields(msg, ADVERTISE, self.config.session, {"party", "c_pk", "s_pk", "sig"}, where)
        entry = _Entry.parse(msg, where)
        if entry.party in self._ads:
            raise SecAggError(f"{where}: {entry.party} already advertised its keys")
        if len(self._ads) >= MAX_PARTIES:
            raise SecAggError(f"{where}: at most {MAX_PARTIES} parties")
        if (
            self._verify
            and self._verify(entry.party, entry.signed_bytes(self.config.session), entry.sig)
            is not True
        ):
            raise SecAggError(f"{where}: the keys of {entry.party} are not signed by it: refused")
        self._ads[entry.party] = entry

    def share_keys_request(self) -> dict[str, Any]:
        """Close round 0 (at least t parties, and 2) and give the request every party of the
        roster gets: see :meth:`SecAggClient.share_keys`."""
        self._turn("advertise", "round 0")
        self._roster = _Roster(self.config, list(self._ads.values()))
        self._state = "shares"
        return {
            "kind": SHARE_KEYS,
            "session": self.config.session,
            "config": self.config.public(),
            "roster": [e.public() for e in self._roster.entries.values()],
        }

    # round 1

    def receive_shares(self, msg: Mapping[str, Any]) -> None:
        """Round 1: a party's sealed shares, one envelope for each of its neighbours."""
        where = "round 1"
        roster = self._turn("shares", where)
        _fields(msg, SHARES, self.config.session, {"party", "shares"}, where)
        party = _check_id(msg["party"], f"{where}: the party")
        if party not in roster.entries:
            raise SecAggError(f"{where}: {party} is not in the roster")
        if party in self._sealed:
            raise SecAggError(f"{where}: {party} already sent its shares")
        shares = _mapping(msg["shares"], f"{where}: {party}'s shares")
        if set(shares) != roster.neighbours[party]:
            raise SecAggError(
                f"{where}: {party} must send shares to exactly its "
                f"{len(roster.neighbours[party])} neighbours"
            )
        self._sealed[party] = {
            p: _unb64(v, f"{where}: {party}'s shares for {p}", channel.SEALED_BYTES)
            for p, v in shares.items()
        }

    def masked_input_requests(self) -> dict[str, dict[str, Any]]:
        """Close round 1 (at least t parties shared) and give each party that shared its
        request: the envelopes addressed to it (see :meth:`SecAggClient.masked_input`)."""
        where = "round 1"
        roster = self._turn("shares", where)
        if len(self._sealed) < roster.t:
            raise SecAggError(
                f"{where}: {len(self._sealed)} parties sent their shares, "
                f"{roster.t} are required (the threshold)"
            )
        self._state = "masked"
        self._total = torch.zeros(self.config.length, dtype=torch.int64)
        return {
            u: {
                "kind": MASKED_INPUT_REQUEST,
                "session": self.config.session,
                "shares": {v: b64(out[u]) for v, out in sorted(self._sealed.items()) if u in out},
            }
            for u in self.shared
        }

    # round 2

    def receive_masked_input(self, msg: Mapping[str, Any]) -> None:
        """Round 2: a party's masked input, added to the running sum at once."""
        where = "round 2"
        roster = self._turn("masked", where)
        _fields(msg, MASKED_INPUT, self.config.session, {"party", "masked"}, where)
        party = _check_id(msg["party"], f"{where}: the party")
        if party not in self._sealed:
            raise SecAggError(f"{where}: {party} did not take part in round 1")
        if party in self._masked:
            raise SecAggError(f"{where}: {party} already sent its masked input")
        y = msg["masked"]
        if (
            not isinstance(y, torch.Tensor)
            or y.dtype != torch.int64
            or tuple(y.shape) != (self.config.length,)
        ):
            raise SecAggError(
                f"{where}: {party}'s masked input must be an int64 tensor of "
                f"shape ({self.config.length},)"
            )
        if int(y.min()) < 0 or int(y.max()) >> roster.bits:
            raise SecAggError(f"{where}: {party}'s masked input is outside [0, 2**{roster.bits})")
        assert self._total is not None
        self._total.add_(y).bitwise_and_((1 << roster.bits) - 1)
        self._masked.add(party)

    def _close_masked(self, where: str) -> None:
        roster = self._roster
        assert roster
        if len(self._masked) < roster.t:
            raise SecAggError(
                f"{where}: {len(self._masked)} parties sent masked inputs, "
                f"{roster.t} are required (the threshold)"
            )
        roster.split(sorted(self._masked), where)
        self._survivors = sorted(self._masked)
        self._dropped = [p for p in self.shared if p not in self._masked]

    def consistency_request(self) -> dict[str, Any]:
        """Close round 2 (at least t masked inputs) and ask the survivors to sign their list
        (see :meth:`SecAggClient.confirm`)."""
        if not self.config.consistency_check:
            raise SecAggError("consistency check: this session has none")
        self._turn("masked", "round 2")
        self._close_masked("round 2")
        self._state = "confirm"
        return {"kind": CONSISTENCY, "session": self.config.session, "survivors": self.survivors}

    def receive_confirmation(self, msg: Mapping[str, Any]) -> None:
        """Consistency check: a survivor's signature on the list of survivors."""
        where = "consistency check"
        self._turn("confirm", where)
        _fields(msg, CONFIRM, self.config.session, {"party", "sig"}, where)
        party = _check_id(msg["party"], f"{where}: the party")
        if party not in self._survivors:
            raise SecAggError(f"{where}: {party} is not a survivor")
        if party in self._confirmations:
            raise SecAggError(f"{where}: {party} already confirmed")
        sig = _signature(msg["sig"], f"{where}: {party}'s signature")
        signed = survivors_bytes(self.config.session, self._survivors)
        if self._verify and self._verify(party, signed, sig) is not True:
            raise SecAggError(f"{where}: {party}'s signature does not verify: refused")
        self._confirmations[party] = sig

    def unmask_request(self) -> dict[str, Any]:
        """Close round 2 (or the consistency check: t signatures needed) and ask the
        survivors for their shares (see :meth:`SecAggClient.unmask`)."""
        if self.config.consistency_check:
            roster = self._turn("confirm", "consistency check")
            if len(self._confirmations) < roster.t:
                raise SecAggError(
                    f"consistency check: {len(self._confirmations)} survivors signed the list, "
                    f"{roster.t} are required (the threshold)"
                )
            # the clients will want t signatures from each share group they reveal shares of
            masked_against = [v for v in self._dropped if self._masked & self._sealed[v].keys()]
            for v in [*self._survivors, *masked_against]:
                have = len(roster.group(v) & self._confirmations.keys())
                if have < roster.t:
                    raise SecAggError(
                        f"consistency check: {have} of the {roster.t} required signatures from "
                        f"{v}'s share group"
                    )
        else:
            self._turn("masked", "round 2")
            self._close_masked("round 2")
        self._state = "unmask"
        return {
            "kind": UNMASK,
            "session": self.config.session,
            "survivors": self.survivors,
            "dropped": self.dropped,
            "signatures": {p: b64(s) for p, s in sorted(self._confirmations.items())},
        }

    # round 3

    def receive_unmask(self, msg: Mapping[str, Any]) -> None:
        """Round 3: a survivor's shares (b of survivors, s_sk of dropped parties)."""
        where = "round 3"
        roster = self._turn("unmask", where)
        _fields(msg, UNMASK_SHARES, self.config.session, {"party", "b_shares", "s_shares"}, where)
        party = _check_id(msg["party"], f"{where}: the party")
        if party not in self._survivors:
            raise SecAggError(f"{where}: {party} is not a survivor")
        if party in self._answered:
            raise SecAggError(f"{where}: {party} already sent its shares")
        group = roster.group(party)
        holds = {p for p in group if p == party or party in self._sealed.get(p, {})}
        want_b = holds & set(self._survivors)
        want_s = holds & set(self._dropped)
        b = _mapping(msg["b_shares"], f"{where}: {party}'s b_shares")
        s = _mapping(msg["s_shares"], f"{where}: {party}'s s_shares")
        if set(b) != want_b or set(s) != want_s:
            raise SecAggError(
                f"{where}: {party} must send the shares it holds of exactly "
                f"{len(want_b)} survivors and {len(want_s)} dropped parties"
            )
        x = roster.x[party]

        def value(v: Any, whose: str) -> tuple[int, int]:
            raw = _unb64(v, f"{where}: {party}'s share for {whose}", shamir.VALUE_BYTES)
            return (x, shamir.decode_value(raw))

        b_values = {p: value(v, p) for p, v in b.items()}
        s_values = {p: value(v, p) for p, v in s.items()}
        for p, share in b_values.items():
            self._b_shares.setdefault(p, []).append(share)
        for p, share in s_values.items():
            self._s_shares.setdefault(p, []).append(share)
        self._answered.add(party)

    def _combine(self, shares: dict[str, list[tuple[int, int]]], party: str, what: str) -> bytes:
        roster = self._roster
        assert roster
        have = shares.get(party, [])
        if len(have) < roster.t:
            raise SecAggError(
                f"round 3: {len(have)} of the {roster.t} required shares for {party} ({what})"
            )
        try:
            secret = shamir.combine(have, roster.t)
        except SecAggError as exc:
            raise SecAggError(f"round 3: {party}'s {what}: {exc}") from None
        if len(secret) != KEY_BYTES:
            raise SecAggError(f"round 3: {party}'s {what} is {len(secret)} bytes, not {KEY_BYTES}")
        return secret

    def result(self) -> torch.Tensor:
        """Close round 3 and return the sum of the survivors' inputs (float64, ``length``
        values): rebuild each survivor's self-mask seed and each dropped party's mask key from
        t shares, take their masks off, dequantize."""
        roster = self._turn("unmask", "round 3")
        session = self.config.session
        self_seeds = {
            u: self._combine(self._b_shares, u, "self-mask seed") for u in self._survivors
        }
        pair_seeds: dict[tuple[str, str], bytes] = {}
        survivors = set(self._survivors)
        for v in self._dropped:
            maskers = sorted(u for u in self._sealed[v] if u in survivors)
            if not maskers:
                continue
            raw = self._combine(self._s_shares, v, "mask key")
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if s_sk.public_key().public_bytes_raw() != roster.entries[v].s_pk:
                raise SecAggError(
                    f"round 3: the shares of {v}'s mask key do not give the key it "
                    "advertised (a survivor sent a wrong share)"
                )
            for u in maskers:
                pair_seeds[(u, v)] = masking.pair_seed(s_sk, roster.s_pk(u), session, u, v)
        assert self._total is not None
        total = masking.unmask(self._total, self_seeds, pair_seeds, roster.bits)
        out = roster.quantizer.dequantize(total, len(self._survivors))
        self._state = "done"
        self._total = None
        return out
