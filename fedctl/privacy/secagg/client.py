"""A site's side of one secure-aggregation session: :class:`SecAggClient` (see
:mod:`fedctl.privacy.secagg.protocol` for the rounds and the messages)."""

from __future__ import annotations

import base64
import binascii
import random
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedctl.privacy.secagg import channel, masking, shamir
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.protocol import (
    ADVERTISE,
    CONFIRM,
    CONSISTENCY,
    KEY_BYTES,
    MASKED_INPUT,
    MASKED_INPUT_REQUEST,
    MAX_PARTIES,
    MAX_SIGNATURE,
    SHARE_KEYS,
    SHARES,
    UNMASK,
    UNMASK_SHARES,
    SecAggConfig,
    Signer,
    Verifier,
    _check_id,
    _Entry,
    _fields,
    _mapping,
    _party_list,
    _Roster,
    _signature,
    _unb64,
    advertisement_bytes,
    b64,
    survivors_bytes,
)


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

    #: the steps at which a party may be saved and restored (between two rounds)
    STATES = ("new", "advertised", "shared", "masked", "confirmed", "done")

    def export_state(self) -> dict[str, Any]:
        """Everything this party holds between two rounds, as JSON-able data, so a site runtime
        can keep it in a file between tasks. It holds the party's secrets (its private keys,
        its self-mask seed and the shares it received): store it like a private key."""
        roster = self._roster
        return {
            "party": self.party,
            "config": self.config.public(),
            "state": self._state,
            "c_sk": b64(self._c_sk.private_bytes_raw()) if self._c_sk else None,
            "s_sk": b64(self._s_sk.private_bytes_raw()) if self._s_sk else None,
            "roster": [e.public() for e in roster.entries.values()] if roster else None,
            "b": b64(self._b),
            "own": [b64(shamir.encode_value(y)) for y in self._own],
            "inbound": {p: b64(v) for p, v in self._inbound.items()},
            "confirmed": self._confirmed,
        }

    @classmethod
    def restore(
        cls,
        data: Mapping[str, Any],
        sign: Signer,
        verify: Verifier,
        rng: random.Random | None = None,
    ) -> SecAggClient:
        """The party :meth:`export_state` saved (refused, one line, if the data is damaged)."""
        where = "restoring a party"
        try:
            config = SecAggConfig(**data["config"])
            client = cls(data["party"], config, sign, verify, rng)
            state = data["state"]
            if state not in cls.STATES:
                raise SecAggError(f"{where}: unknown state {state!r:.40}")
            keys = []
            for name in ("c_sk", "s_sk"):
                raw = data[name]
                keys.append(
                    None
                    if raw is None
                    else X25519PrivateKey.from_private_bytes(
                        _unb64(raw, f"{where}: {name}", KEY_BYTES)
                    )
                )
            client._c_sk, client._s_sk = keys
            if data["roster"] is not None:
                entries = [_Entry.parse(e, f"{where}: the roster") for e in data["roster"]]
                client._roster = _Roster(config, entries)
            client._b = base64_bytes(data["b"])
            ys, yb = (shamir.decode_value(base64_bytes(v)) for v in data["own"])
            client._own = (ys, yb)
            client._inbound = {
                p: _unb64(v, f"{where}: shares from {p}", channel.SEALED_BYTES)
                for p, v in data["inbound"].items()
            }
            confirmed = data["confirmed"]
            client._confirmed = None if confirmed is None else [str(p) for p in confirmed]
            client._state = state
        except SecAggError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggError(f"{where}: damaged state ({type(exc).__name__}: {exc})") from None
        if state != "new" and (client._c_sk is None or client._s_sk is None):
            raise SecAggError(f"{where}: damaged state (keys missing at {state!r})")
        if state in ("shared", "masked", "confirmed", "done") and client._roster is None:
            raise SecAggError(f"{where}: damaged state (no roster at {state!r})")
        return client

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


def base64_bytes(value: Any) -> bytes:
    """Bytes of a base64 string (possibly empty), or a SecAggError."""
    if not isinstance(value, str):
        raise SecAggError("a saved value is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SecAggError("a saved value is not base64") from None
