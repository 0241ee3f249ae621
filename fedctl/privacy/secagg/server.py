"""The server's side of one secure-aggregation session: :class:`SecAggServer` (see
:mod:`fedctl.privacy.secagg.protocol` for the rounds and the messages)."""

from __future__ import annotations

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
    SHARE_KEYS,
    SHARES,
    UNMASK,
    UNMASK_SHARES,
    SecAggConfig,
    Verifier,
    _check_id,
    _Entry,
    _fields,
    _mapping,
    _Roster,
    _signature,
    _unb64,
    b64,
    count,
    survivors_bytes,
)


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
                f"{where}: {count(len(self._sealed), 'party', 'parties')} sent their shares, "
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
                f"{where}: {count(len(self._masked), 'party', 'parties')} sent masked inputs, "
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
                    f"consistency check: "
                    f"{count(len(self._confirmations), 'survivor', 'survivors')} signed the list, "
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
