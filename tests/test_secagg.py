"""Secure aggregation (fedctl.privacy.secagg): Shamir sharing, quantization, masks, the sealed
share envelopes, the neighbourhood graph, and whole sessions of in-memory parties — sums,
dropouts at every point, forged keys, a server that equivocates, and what the server sees."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import time
from collections.abc import Iterable

import pytest
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedctl.privacy.secagg import (
    Quantizer,
    SecAggClient,
    SecAggConfig,
    SecAggConfigError,
    SecAggError,
    SecAggServer,
    channel,
    graph,
    masking,
    pack_weighted,
    shamir,
    suggested_bits,
    unpack_weighted,
    weighted_bound,
)
from fedctl.privacy.secagg.protocol import b64

# ---------------------------------------------------------------------------------- Shamir


@pytest.mark.parametrize("secret", [b"", b"\x00", b"\x00\x00abc", bytes(range(32)), b"\xff" * 64])
def test_shamir_round_trip_from_any_t_shares(secret: bytes) -> None:
    rng = random.Random(1)
    shares = shamir.split(secret, 7, 4, rng)
    assert [x for x, _ in shares] == list(range(1, 8))
    for _ in range(5):
        assert shamir.combine(rng.sample(shares, 4), 4) == secret
    assert shamir.combine(shares, 4) == secret  # more than t: fine
    assert shamir.combine(shamir.split(secret, 1, 1), 1) == secret
    assert shamir.combine(shamir.split(secret, 5, 5, rng), 5) == secret


def test_shamir_fewer_than_t_shares_say_nothing_and_are_refused() -> None:
    secret = b"k" * 32
    shares = shamir.split(secret, 5, 3, random.Random(2))
    with pytest.raises(SecAggError, match="2 of the 3 required shares"):
        shamir.combine(shares[:2], 3)
    # two shares of a degree-2 polynomial, read as if the threshold were 2: not the secret
    with pytest.raises(SecAggError, match="inconsistent"):
        assert shamir.combine(shares[:2], 2) != secret


def test_shamir_shares_at_chosen_points_and_reproducible_rng() -> None:
    shares = shamir.split(b"seed", 100, 3, random.Random(3), xs=[5, 17, 99, 100])
    assert [x for x, _ in shares] == [5, 17, 99, 100]
    assert shamir.combine(shares[1:], 3) == b"seed"
    assert shares == shamir.split(b"seed", 100, 3, random.Random(3), xs=[5, 17, 99, 100])
    assert shamir.split(b"seed", 3, 2) != shamir.split(b"seed", 3, 2)  # CSPRNG by default


def test_shamir_detects_a_share_replaced_by_garbage() -> None:
    rng = random.Random(4)
    shares = shamir.split(b"s" * 32, 5, 3, rng)
    caught = 0
    for _ in range(50):
        try:
            shamir.combine([(1, rng.randrange(shamir.PRIME)), *shares[1:3]], 3)
        except SecAggError as exc:
            assert "inconsistent" in str(exc)
            caught += 1
    assert caught >= 45  # about 255 in 256


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("s", 3, 2), {}, "must be bytes"),
        ((b"x" * 65, 3, 2), {}, "over the 64-byte limit"),
        ((b"s", 3, 4), {}, "t must be in 1..n"),
        ((b"s", 3, 0), {}, "t must be in 1..n"),
        ((b"s", 0, 1), {}, "n must be in"),
        ((b"s", shamir.MAX_SHARES + 1, 2), {}, "n must be in"),
        ((b"s", 3.0, 2), {}, "n must be an integer"),
        ((b"s", 3, True), {}, "t must be an integer"),
        ((b"s", 3, 2), {"xs": [1, 1]}, "appears twice"),
        ((b"s", 3, 2), {"xs": [0, 1]}, "outside 1..3"),
        ((b"s", 3, 2), {"xs": [1, 4]}, "outside 1..3"),
    ],
)
def test_shamir_split_refuses_bad_input(args, kwargs, match) -> None:
    with pytest.raises(SecAggConfigError, match=match):
        shamir.split(*args, **kwargs)


def test_shamir_combine_refuses_bad_input() -> None:
    shares = shamir.split(b"s", 3, 2, random.Random(5))
    with pytest.raises(SecAggConfigError, match="appears twice"):
        shamir.combine([shares[0], shares[0]], 2)
    with pytest.raises(SecAggConfigError, match="outside"):
        shamir.combine([(0, 1), shares[1]], 2)
    with pytest.raises(SecAggConfigError, match="outside the field"):
        shamir.combine([(1, shamir.PRIME), shares[1]], 2)
    with pytest.raises(SecAggConfigError, match="a pair"):
        shamir.combine([[1, 2], shares[1]], 2)  # type: ignore[list-item]
    with pytest.raises(SecAggConfigError, match="at least 1"):
        shamir.combine(shares, 0)
    with pytest.raises(SecAggConfigError, match="integer"):
        shamir.combine(shares, "2")  # type: ignore[arg-type]


def test_shamir_value_encoding() -> None:
    assert shamir.decode_value(shamir.encode_value(shamir.PRIME - 1)) == shamir.PRIME - 1
    assert len(shamir.encode_value(0)) == shamir.VALUE_BYTES
    with pytest.raises(SecAggConfigError):
        shamir.encode_value(shamir.PRIME)
    with pytest.raises(SecAggError, match="66 bytes"):
        shamir.decode_value(b"\x00" * 65)
    with pytest.raises(SecAggError, match="outside the field"):
        shamir.decode_value(b"\xff" * 66)


# ---------------------------------------------------------------------------- quantization


@pytest.mark.parametrize(("bits", "n"), [(8, 3), (16, 10), (24, 100)])
def test_quantized_sum_is_within_the_documented_bound(bits: int, n: int) -> None:
    q = Quantizer(2.5, bits, n)
    g = torch.Generator().manual_seed(bits)
    xs = [(torch.rand(5000, generator=g, dtype=torch.float64) * 2 - 1) * 2.5 for _ in range(n)]
    total = torch.stack([q.quantize(x) for x in xs]).sum(0)
    err = (q.dequantize(total, n) - torch.stack(xs).sum(0)).abs().max().item()
    assert err <= q.error_bound(n) * (1 + 1e-9)
    assert q.error_bound(n) == pytest.approx(n * 2.5 / (2**bits - 1))
    # the sum of the last quantized values of n parties never exceeds the modulus
    assert int(total.max()) < q.modulus


def test_stochastic_rounding_is_unbiased_and_within_its_bound() -> None:
    q = Quantizer(1.0, 4, 1)
    x = torch.full((200_000,), 0.123456, dtype=torch.float64)
    levels = q.quantize(x, torch.Generator().manual_seed(0))
    back = q.dequantize(levels, 1)
    assert (back - x).abs().max().item() < q.error_bound(1, stochastic=True)
    assert back.mean().item() == pytest.approx(0.123456, abs=2e-3)  # step 0.13: unbiased
    nearest = q.dequantize(q.quantize(x), 1)
    assert abs(nearest.mean().item() - 0.123456) > 0.01  # rounding to nearest is biased here


@pytest.mark.parametrize("n", [1, 2, 3, 100, 1000])
def test_no_overflow_at_the_worst_case(n: int) -> None:
    q = Quantizer(3.0, 20, n)
    assert q.modulus_bits == 20 + math.ceil(math.log2(n)) + 1
    for value in (3.0, 1e9, -3.0, -1e9):  # at the bound and clipped to it
        one = q.quantize(torch.full((4,), value))
        total = (one * n) % q.modulus  # the modular sum of n parties
        assert torch.equal(total, one * n)  # never wrapped
        assert q.dequantize(total, n).tolist() == pytest.approx([math.copysign(3.0 * n, value)] * 4)


def test_quantize_maps_the_range_onto_q_bits() -> None:
    q = Quantizer(1.0, 3, 2)
    assert q.quantize(torch.tensor([-1.0, 0.0, 1.0, -7.0, 7.0])).tolist() == [0, 4, 7, 0, 7]
    assert q.quantize(torch.tensor([[1, -1]], dtype=torch.int32)).tolist() == [7, 0]  # flat
    assert q.levels == 7 and q.step == pytest.approx(2 / 7) and q.modulus == 2**5


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 8, 2), "> 0"),
        ((-1.0, 8, 2), "> 0"),
        ((math.nan, 8, 2), "finite"),
        ((math.inf, 8, 2), "finite"),
        ((True, 8, 2), "finite"),
        ((1.0, 0, 2), "bits must be 1..52"),
        ((1.0, 53, 2), "bits must be 1..52"),
        ((1.0, 8.0, 2), "bits must be an integer"),
        ((1.0, 8, 0), "parties must be at least 1"),
        ((1.0, 8, 70_000), "at most 65535 parties"),
        ((1.0, 52, 2**12), "over 62"),
    ],
)
def test_quantizer_refuses_bad_parameters(args, match) -> None:
    with pytest.raises(SecAggConfigError, match=match):
        Quantizer(*args)


def test_quantize_and_dequantize_refuse_bad_input() -> None:
    q = Quantizer(1.0, 8, 4)
    with pytest.raises(SecAggError, match="NaN"):
        q.quantize(torch.tensor([0.0, math.nan]))
    with pytest.raises(SecAggError, match="NaN"):
        q.quantize(torch.tensor([math.inf]))
    with pytest.raises(SecAggError, match="needs a tensor"):
        q.quantize([0.0])  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="real numbers"):
        q.quantize(torch.tensor([1j]))
    with pytest.raises(SecAggError, match="real numbers"):
        q.quantize(torch.tensor([True]))
    good = q.quantize(torch.zeros(3)) * 2
    with pytest.raises(SecAggError, match="count"):
        q.dequantize(good, 5)
    with pytest.raises(SecAggError, match="count"):
        q.dequantize(good, -1)
    with pytest.raises(SecAggError, match="int64"):
        q.dequantize(good.float(), 2)
    with pytest.raises(SecAggError, match="not a sum"):
        q.dequantize(good, 1)  # 2 values' worth in a sum of 1
    with pytest.raises(SecAggError, match="not a sum"):
        q.dequantize(torch.tensor([-1]), 1)


def test_weighted_vectors_unpack_to_the_weighted_sum_and_the_total_weight() -> None:
    g = torch.Generator().manual_seed(0)
    clip, n = 0.05, 5
    xs = [(torch.rand(300, generator=g) * 2 - 1) * clip for _ in range(n)]
    ws = [0.1, 1.0, 0.5, 0.0, 0.73]
    q = Quantizer(weighted_bound(1.0), 24, n)
    total = sum(q.quantize(pack_weighted(x, w, clip)) for x, w in zip(xs, ws, strict=True))
    wx, w = unpack_weighted(q.dequantize(total, n), clip)
    true_wx = sum(w * x.double() for x, w in zip(xs, ws, strict=True))
    assert (wx - true_wx).abs().max().item() <= n * 1.0 * clip / (2**24 - 1) * (1 + 1e-9)
    assert w == pytest.approx(sum(ws), abs=n / (2**24 - 1))
    assert pack_weighted(torch.ones(2, 2), 2.0, 4.0).tolist() == [0.5] * 4 + [2.0]


def test_weighted_helpers_refuse_bad_input() -> None:
    for bad in (0, -1.0, math.nan, math.inf, "1"):
        with pytest.raises(SecAggConfigError):
            weighted_bound(bad)  # type: ignore[arg-type]
        with pytest.raises(SecAggConfigError):
            pack_weighted(torch.ones(2), 1.0, bad)  # type: ignore[arg-type]
        with pytest.raises(SecAggConfigError):
            unpack_weighted(torch.ones(2), bad)  # type: ignore[arg-type]
    for bad in (-0.5, math.nan, "w"):
        with pytest.raises(SecAggError, match="weight"):
            pack_weighted(torch.ones(2), bad, 1.0)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="tensor"):
        pack_weighted([1.0], 1.0, 1.0)  # type: ignore[arg-type]
    for bad in (torch.ones(2, 2), torch.ones(0), [1.0]):
        with pytest.raises(SecAggError, match="1-D"):
            unpack_weighted(bad, 1.0)  # type: ignore[arg-type]


def test_suggested_bits_meets_the_error_asked_for() -> None:
    for parties, bound, error in [(100, 1.0, 1e-6), (3, 10.0, 0.1), (1000, 0.01, 1e-9)]:
        bits = suggested_bits(parties, bound, error)
        assert Quantizer(bound, bits, parties).error_bound(parties) <= error
        assert Quantizer(bound, bits - 1, parties).error_bound(parties) > error
    with pytest.raises(SecAggConfigError, match="needs"):
        suggested_bits(10, 1.0, 0.0)
    with pytest.raises(SecAggConfigError, match="more than 52"):
        suggested_bits(10, 1.0, 1e-20)


# ------------------------------------------------------------------------------- masking


def test_prg_is_deterministic_uniform_in_range_and_fast() -> None:
    seed = bytes(range(32))
    a = masking.prg(seed, 100_000, 40)
    assert torch.equal(a, masking.prg(seed, 100_000, 40))
    assert not torch.equal(a, masking.prg(bytes(32), 100_000, 40))
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 2**40
    assert int(a.max()) > 2**40 * 0.999 and int(a.min()) < 2**40 * 0.001
    # a prefix of a longer stream: chunking does not change the values
    assert torch.equal(masking.prg(seed, 3, 62), masking.prg(seed, 2_000_000, 62)[:3])
    assert masking.prg(seed, 0, 8).numel() == 0
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        masking.prg(seed, 10_000_000, 62)
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0, f"a 10M-element mask took {best:.2f} s"


def test_prg_refuses_bad_input() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        masking.prg(b"short", 10, 8)
    with pytest.raises(SecAggError, match="32 bytes"):
        masking.prg("x" * 32, 10, 8)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="length"):
        masking.prg(bytes(32), -1, 8)
    with pytest.raises(SecAggError, match="length"):
        masking.prg(bytes(32), 2**31, 8)
    for bits in (0, 63, 8.0):
        with pytest.raises(SecAggError, match="bits"):
            masking.prg(bytes(32), 10, bits)  # type: ignore[arg-type]


def _x25519(i: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([i]) * 32)


def test_pair_seeds_agree_and_depend_on_session_and_pair() -> None:
    a, b = _x25519(1), _x25519(2)
    ab = masking.pair_seed(a, b.public_key(), "s1", "alice", "bob")
    assert ab == masking.pair_seed(b, a.public_key(), "s1", "bob", "alice")
    assert ab != masking.pair_seed(a, b.public_key(), "s2", "alice", "bob")
    assert ab != masking.pair_seed(a, b.public_key(), "s1", "alice", "carol")
    assert len(ab) == 32
    with pytest.raises(SecAggError, match="small order"):
        masking.pair_seed(a, X25519PublicKey.from_public_bytes(bytes(32)), "s", "a", "b")


def test_fields_encoding_is_unambiguous() -> None:
    assert masking.encode_fields("ab", "c") != masking.encode_fields("a", "bc")
    assert masking.encode_fields(b"\x00", "") == b"\x00\x00\x00\x01\x00\x00\x00\x00\x00"


def test_pairwise_masks_cancel_and_self_masks_come_off() -> None:
    bits, n = 30, 50
    values = {
        p: torch.randint(0, 2**20, (n,), generator=torch.Generator().manual_seed(i))
        for i, p in enumerate("abc")
    }
    pair = {("a", "b"): b"1" * 32, ("a", "c"): b"2" * 32, ("b", "c"): b"3" * 32}
    own = {p: bytes([i]) * 32 for i, p in enumerate("abc")}
    masked = {}
    for p in "abc":
        seeds = {(set(k) - {p}).pop(): s for k, s in pair.items() if p in k}
        masked[p] = masking.mask(values[p], own[p], seeds, p, bits)
        assert not torch.equal(masked[p], values[p])
    total = (masked["a"] + masked["b"] + masked["c"]) % 2**bits
    clean = masking.unmask(total, own, {}, bits)
    assert torch.equal(clean, values["a"] + values["b"] + values["c"])
    # c dropped: a and b's masks against c come off with c's seeds
    total = (masked["a"] + masked["b"]) % 2**bits
    pairs = {("a", "c"): pair[("a", "c")], ("b", "c"): pair[("b", "c")]}
    clean = masking.unmask(total, {"a": own["a"], "b": own["b"]}, pairs, bits)
    assert torch.equal(clean, values["a"] + values["b"])
    assert masking.sign("a", "b") == 1 and masking.sign("b", "a") == -1


def test_mask_refuses_bad_input() -> None:
    with pytest.raises(SecAggError, match="itself"):
        masking.sign("a", "a")
    with pytest.raises(SecAggError, match="itself"):
        masking.mask(torch.zeros(3, dtype=torch.int64), bytes(32), {"a": bytes(32)}, "a", 8)
    for bad in (torch.zeros(3), torch.zeros(3, 1, dtype=torch.int64), [0, 1]):
        with pytest.raises(SecAggError, match="1-D int64"):
            masking.mask(bad, bytes(32), {}, "a", 8)  # type: ignore[arg-type]
        with pytest.raises(SecAggError, match="1-D int64"):
            masking.unmask(bad, {}, {}, 8)  # type: ignore[arg-type]
    for bad in (torch.tensor([256]), torch.tensor([-1])):
        with pytest.raises(SecAggError, match="outside"):
            masking.mask(bad, bytes(32), {}, "a", 8)


# ------------------------------------------------------------------ sealed share envelopes


def test_sealed_shares_open_only_for_their_recipient() -> None:
    alice, bob, carol = _x25519(1), _x25519(2), _x25519(3)
    rng = random.Random(0)
    sealed = channel.seal(alice, bob.public_key(), "s", "alice", "bob", (5, 7), rng)
    assert len(sealed) == channel.SEALED_BYTES
    assert channel.open_sealed(bob, alice.public_key(), "s", "alice", "bob", sealed) == (5, 7)
    for args in [
        (carol, alice.public_key(), "s", "alice", "carol"),  # carol cannot read bob's
        (bob, alice.public_key(), "other", "alice", "bob"),  # another session
        (bob, carol.public_key(), "s", "carol", "bob"),  # passed off as carol's
        (alice, bob.public_key(), "s", "bob", "alice"),  # the other direction
    ]:
        with pytest.raises(SecAggError, match="do not decrypt"):
            channel.open_sealed(*args, sealed)
    altered = bytearray(sealed)
    altered[20] ^= 1
    with pytest.raises(SecAggError, match="do not decrypt"):
        channel.open_sealed(bob, alice.public_key(), "s", "alice", "bob", bytes(altered))
    with pytest.raises(SecAggError, match="bytes, not"):
        channel.open_sealed(bob, alice.public_key(), "s", "alice", "bob", sealed[:-1])


def test_sealed_shares_of_an_unknown_version_are_refused() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    alice, bob = _x25519(1), _x25519(2)
    key = channel._key(alice, bob.public_key(), "s", "alice", "bob")
    aad = masking.encode_fields("fedctl-secagg/v1/shares", "s", "alice", "bob")
    plain = b"\x02" + bytes(2 * shamir.VALUE_BYTES)
    sealed = bytes(12) + AESGCM(key).encrypt(bytes(12), plain, aad)
    with pytest.raises(SecAggError, match="unknown version 2"):
        channel.open_sealed(bob, alice.public_key(), "s", "alice", "bob", sealed)


# ----------------------------------------------------------------------- neighbourhoods


def test_neighbourhoods_are_complete_or_k_regular_and_symmetric() -> None:
    parties = [f"site-{i}" for i in range(30)]
    full = graph.neighbourhoods(parties, None, b"seed")
    assert all(len(v) == 29 and p not in v for p, v in full.items())
    assert graph.neighbourhoods(parties, 30, b"seed") == full
    sparse = graph.neighbourhoods(parties, 6, b"seed")
    for p, nbrs in sparse.items():
        assert len(nbrs) == 6 and p not in nbrs
        assert all(p in sparse[q] for q in nbrs)
    assert sparse == graph.neighbourhoods(list(reversed(parties)), 6, b"seed")
    assert sparse != graph.neighbourhoods(parties, 6, b"other seed")


def test_neighbourhoods_refuse_bad_input() -> None:
    for bad in (3, 0, -2, 2.0):
        with pytest.raises(SecAggConfigError, match="even number"):
            graph.neighbourhoods(["a", "b", "c", "d", "e"], bad, b"s")  # type: ignore[arg-type]
    with pytest.raises(SecAggConfigError, match="twice"):
        graph.neighbourhoods(["a", "a", "b"], None, b"s")


def test_roster_seed_depends_on_every_key_not_on_order() -> None:
    entries = [("a", b"1", b"2"), ("b", b"3", b"4")]
    seed = graph.roster_seed("s", entries)
    assert seed == graph.roster_seed("s", list(reversed(entries)))
    assert seed != graph.roster_seed("t", entries)
    assert seed != graph.roster_seed("s", [("a", b"1", b"2"), ("b", b"3", b"5")])


# ------------------------------------------------------------------------- whole sessions


class Run:
    """One session of in-memory parties, step by step (``absent``: who drops before a step).

    Identity keys are Ed25519 (what a deployment's PKI provides); every party's randomness is
    a seeded ``random.Random`` so a failing run can be replayed."""

    def __init__(
        self, n: int, length: int = 48, seed: int = 0, server_verifies: bool = True, **cfg
    ) -> None:
        self.parties = [f"site-{i}" for i in range(1, n + 1)]
        cfg.setdefault("bits", 20)
        self.config = SecAggConfig(session=f"job-1/round-{seed}", length=length, bound=1.0, **cfg)
        self.ids = {
            p: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(p.encode()).digest())
            for p in self.parties
        }
        self.clients = {
            p: SecAggClient(
                p, self.config, self.ids[p].sign, self.verify, random.Random(f"{seed}{p}")
            )
            for p in self.parties
        }
        self.server = SecAggServer(self.config, self.verify if server_verifies else None)
        g = torch.Generator().manual_seed(seed)
        self.inputs = {
            p: torch.rand(length, generator=g, dtype=torch.float64) * 2 - 1 for p in self.parties
        }

    def verify(self, party: str, message: bytes, signature: bytes) -> bool:
        try:
            self.ids[party].public_key().verify(signature, message)
        except (InvalidSignature, KeyError):
            return False
        return True

    def advertise(self, absent: Iterable[str] = ()) -> None:
        for p in self.parties:
            if p not in absent:
                self.server.receive_advertisement(self.clients[p].advertise())

    def share(self, absent: Iterable[str] = ()) -> dict:
        request = self.server.share_keys_request()
        for p in self.server.roster:
            if p not in absent:
                self.server.receive_shares(self.clients[p].share_keys(request))
        return request

    def mask(self, absent: Iterable[str] = ()) -> dict[str, dict]:
        requests = self.server.masked_input_requests()
        for p, request in requests.items():
            if p not in absent:
                out = self.clients[p].masked_input(request, self.inputs[p])
                self.server.receive_masked_input(out)
        return requests

    def confirm(self, absent: Iterable[str] = ()) -> None:
        if self.config.consistency_check:
            request = self.server.consistency_request()
            for p in self.server.survivors:
                if p not in absent:
                    self.server.receive_confirmation(self.clients[p].confirm(request))

    def unmask(self, absent: Iterable[str] = ()) -> dict:
        request = self.server.unmask_request()
        for p in self.server.survivors:
            if p not in absent:
                self.server.receive_unmask(self.clients[p].unmask(request))
        return request

    def run(self, drop: dict[str, Iterable[str]] | None = None) -> torch.Tensor:
        """The whole session; ``drop``: step name → who is gone from that step on."""
        gone: set[str] = set()
        for step in ("advertise", "share", "mask", "confirm", "unmask"):
            gone |= set((drop or {}).get(step, ()))
            getattr(self, step)(gone)
        return self.server.result()

    def expected(self) -> torch.Tensor:
        return sum(self.inputs[p] for p in self.server.survivors)  # type: ignore[return-value]

    def check(self, result: torch.Tensor) -> None:
        count = len(self.server.survivors)
        bound = self.config.quantizer(len(self.parties)).error_bound(count)
        assert result.dtype == torch.float64 and result.shape == (self.config.length,)
        assert (result - self.expected()).abs().max().item() <= bound * (1 + 1e-9)


@pytest.mark.parametrize(("n", "consistency"), [(3, False), (3, True), (10, True), (10, False)])
def test_the_server_gets_the_sum_and_the_roster_plays_by_the_rules(n, consistency) -> None:
    run = Run(n, consistency_check=consistency)
    run.check(run.run())
    assert run.server.survivors == sorted(run.parties) and run.server.dropped == []
    assert run.server.threshold == n // 2 + 1
    assert all(c.state == "done" for c in run.clients.values())
    assert run.server.state == "done"


def test_100_parties_with_secagg_plus_neighbourhoods() -> None:
    run = Run(100, length=16, neighbours=12)
    drop = {"mask": run.parties[::10], "unmask": run.parties[5::10]}  # 10% and 10%
    result = run.run(drop)
    run.check(result)
    assert run.server.threshold == 7  # a majority of the 13 of a share group
    assert len(run.server.survivors) == 90
    # each party shared with its 12 neighbours only
    assert all(len(sealed) == 12 for sealed in run.server._sealed.values())


@pytest.mark.parametrize(
    "drop",
    [
        {"mask": ["site-4"]},  # one party shared its keys, then sent no masked input
        {"mask": ["site-1", "site-5", "site-10"]},  # 30% of them
        {"unmask": ["site-7"]},  # one party masked, then vanished before round 3
        {"unmask": ["site-2", "site-3", "site-9"]},  # 30% of them
        {"share": ["site-6"]},  # advertised keys, never shared
        {"share": ["site-6"], "mask": ["site-2"], "confirm": ["site-3"], "unmask": ["site-8"]},
    ],
    ids=[
        "1-before-mask",
        "30%-before-mask",
        "1-after-mask",
        "30%-after-mask",
        "before-share",
        "at-every-step",
    ],
)
def test_dropouts_leave_the_sum_of_the_survivors(drop) -> None:
    run = Run(10)
    run.check(run.run(drop))
    before_mask = set(drop.get("share", ())) | set(drop.get("mask", ()))
    assert set(run.server.survivors) == set(run.parties) - before_mask
    assert set(run.server.dropped) == set(drop.get("mask", ()))  # the ones who had shared


def test_30_percent_dropping_with_neighbourhoods() -> None:
    run = Run(30, length=16, neighbours=12)  # t = 7 of a share group of 13
    run.check(run.run({"mask": run.parties[::3][:5], "unmask": run.parties[1::3][:4]}))
    assert len(run.server.survivors) == 25 and len(run.server.dropped) == 5


def test_too_many_dropouts_in_one_neighbourhood_fail_with_the_counts() -> None:
    run = Run(30, length=16, neighbours=8)  # t = 5 of 9
    run.advertise(), run.share(), run.mask(), run.confirm()
    victim = "site-1"
    gone = sorted(run.server._roster.neighbours[victim])[:5]  # 4 of its 9 holders remain
    run.unmask(gone)
    with pytest.raises(SecAggError, match=r"round 3: [0-4] of the 5 required shares for site-"):
        run.server.result()


def test_fewer_than_t_survivors_fail_with_the_reason() -> None:
    run = Run(10)  # t = 6
    with pytest.raises(SecAggError, match="round 2: 5 parties sent masked inputs, 6 are required"):
        run.run({"mask": run.parties[:5]})
    run = Run(10, consistency_check=False)
    with pytest.raises(SecAggError, match="round 2: 5 parties sent masked inputs, 6 are required"):
        run.run({"mask": run.parties[:5]})
    run = Run(10)
    with pytest.raises(SecAggError, match="round 1: 5 parties sent their shares, 6 are required"):
        run.run({"share": run.parties[:5]})
    run = Run(10, threshold=8)
    with pytest.raises(SecAggError, match="round 0: 7 parties advertised keys, 8 are required"):
        run.run({"advertise": run.parties[:3]})
    run = Run(10)
    with pytest.raises(SecAggError, match="consistency check: 5 survivors signed the list, 6"):
        run.run({"confirm": run.parties[:5]})


def test_fewer_than_t_shares_in_round_3_name_the_party_and_the_counts() -> None:
    run = Run(5)  # t = 3
    with pytest.raises(
        SecAggError, match=r"round 3: 2 of the 3 required shares for site-1 \(self-mask seed\)"
    ):
        run.run({"unmask": ["site-3", "site-4", "site-5"]})


def test_a_client_refuses_to_unmask_fewer_than_t_survivors() -> None:
    run = Run(5, consistency_check=False)
    run.advertise(), run.share(), run.mask()
    request = run.server.unmask_request()
    request["survivors"], request["dropped"] = ["site-1", "site-2"], ["site-3", "site-4", "site-5"]
    with pytest.raises(SecAggError, match="2 survivors, fewer than the threshold 3: refused"):
        run.clients["site-1"].unmask(request)


def test_a_client_refuses_a_request_for_both_kinds_of_share_of_one_party() -> None:
    run = Run(5, consistency_check=False)
    run.advertise(), run.share(), run.mask()
    request = run.server.unmask_request()
    request["dropped"] = ["site-3"]  # also among the survivors: b and s_sk would both leak
    with pytest.raises(SecAggError, match="both kinds of share of site-3.*refused"):
        run.clients["site-1"].unmask(request)
    assert run.clients["site-1"].state == "masked"  # nothing was revealed


def test_the_consistency_check_stops_a_server_that_equivocates_about_survivors() -> None:
    run = Run(7)  # t = 4
    run.advertise(), run.share(), run.mask(), run.confirm()
    honest = run.server.unmask_request()
    # the server tells site-1 that site-7 dropped, to get its mask key as well as its seed
    lie = dict(honest, survivors=run.parties[:6], dropped=["site-7"])
    with pytest.raises(SecAggError, match="differ from those this party confirmed"):
        run.clients["site-1"].unmask(lie)
    # ...or presents a list no survivor signed
    forged = dict(honest, signatures={p: b64(b"x" * 64) for p in run.parties})
    with pytest.raises(
        SecAggError, match="0 of the 4 required signatures on the list of survivors from site-1's"
    ):
        run.clients["site-1"].unmask(forged)
    few = dict(honest, signatures=dict(list(honest["signatures"].items())[:3]))
    with pytest.raises(SecAggError, match="3 of the 4 required"):
        run.clients["site-1"].unmask(few)
    assert run.clients["site-1"].unmask(honest)["b_shares"]


def test_the_consistency_check_is_refused_where_it_is_off_and_needed_where_on() -> None:
    run = Run(3, consistency_check=False)
    run.advertise(), run.share(), run.mask()
    with pytest.raises(SecAggError, match="has none"):
        run.server.consistency_request()
    with pytest.raises(SecAggError, match="no consistency check"):
        run.clients["site-1"].confirm({"kind": "secagg/consistency"})
    request = run.server.unmask_request()
    with pytest.raises(SecAggError, match="signatures in a session without"):
        run.clients["site-1"].unmask(dict(request, signatures={"site-1": b64(b"sig")}))
    run = Run(3)
    run.advertise(), run.share(), run.mask()
    with pytest.raises(SecAggError, match="out of turn"):
        run.server.unmask_request()  # the check comes first
    with pytest.raises(SecAggError, match="out of turn"):
        run.clients["site-1"].unmask({})
    request = run.server.consistency_request()
    bad = {
        "kind": "secagg/confirm",
        "session": run.config.session,
        "party": "site-1",
        "sig": b64(b"not a signature"),
    }
    with pytest.raises(SecAggError, match="does not verify"):
        run.server.receive_confirmation(bad)
    with pytest.raises(SecAggError, match="not a survivor"):
        run.server.receive_confirmation(dict(bad, party="site-9"))
    with pytest.raises(SecAggError, match="this party .site-1. is not among the survivors"):
        run.clients["site-1"].confirm(dict(request, survivors=["site-2", "site-3"]))
    run.server.receive_confirmation(run.clients["site-1"].confirm(request))
    with pytest.raises(SecAggError, match="already confirmed"):
        run.server.receive_confirmation(
            run.clients["site-2"].confirm(request) | {"party": "site-1"}
        )


def test_forged_or_substituted_keys_are_refused_by_the_clients() -> None:
    run = Run(4, server_verifies=False)
    run.advertise()
    request = run.server.share_keys_request()
    own_key = X25519PrivateKey.from_private_bytes(bytes(32)).public_key().public_bytes_raw()
    # the server puts its own mask key in site-2's entry (to unmask site-2's pairs itself)
    forged = dict(request, roster=[dict(e) for e in request["roster"]])
    forged["roster"][1]["s_pk"] = b64(own_key)
    for p in ("site-1", "site-3", "site-4"):
        with pytest.raises(SecAggError, match="keys advertised for site-2 are not signed by"):
            run.clients[p].share_keys(forged)
    with pytest.raises(SecAggError, match="other keys for this party"):
        run.clients["site-2"].share_keys(forged)
    missing = dict(request, roster=request["roster"][1:])
    with pytest.raises(SecAggError, match="site-1. is not in the roster"):
        run.clients["site-1"].share_keys(missing)
    twice = dict(request, roster=[*request["roster"], request["roster"][0]])
    with pytest.raises(SecAggError, match="names a party twice"):
        run.clients["site-1"].share_keys(twice)
    other = dict(request, config=dict(request["config"], bits=21, threshold=4))
    with pytest.raises(SecAggError, match=r"parameters differ from this party's \(bits, threshold"):
        run.clients["site-1"].share_keys(other)
    more = dict(request, config=dict(request["config"], extra=1))
    with pytest.raises(SecAggError, match="unknown settings"):
        run.clients["site-1"].share_keys(more)
    assert run.clients["site-1"].share_keys(request)["shares"]  # the honest roster is fine


def test_a_forged_advertisement_is_refused_by_a_verifying_server_and_by_clients() -> None:
    run = Run(3)
    forged = run.clients["site-1"].advertise()
    forged["sig"] = b64(run.ids["site-2"].sign(b"something else"))
    with pytest.raises(SecAggError, match="round 0: the keys of site-1 are not signed by it"):
        run.server.receive_advertisement(forged)
    lax = Run(3, server_verifies=False)
    lax.server.receive_advertisement(dict(lax.clients["site-1"].advertise(), sig=forged["sig"]))
    lax.advertise(["site-1"])
    request = lax.server.share_keys_request()
    with pytest.raises(SecAggError, match="site-1 are not signed by site-1"):
        lax.clients["site-2"].share_keys(request)


def test_a_party_cannot_open_shares_sealed_for_another() -> None:
    run = Run(4, consistency_check=False)
    run.advertise(), run.share()
    requests = run.server.masked_input_requests()
    # the server hands site-2 the envelope site-1 sealed for site-3, as if site-1's for site-2
    requests["site-2"]["shares"]["site-1"] = requests["site-3"]["shares"]["site-1"]
    for p, r in requests.items():
        run.server.receive_masked_input(run.clients[p].masked_input(r, run.inputs[p]))
    request = run.server.unmask_request()
    with pytest.raises(SecAggError, match="shares from site-1 do not decrypt for site-2"):
        run.clients["site-2"].unmask(request)


def _chi_square_bytes(values: torch.Tensor) -> float:
    counts = torch.bincount((values & 0xFF).to(torch.int64), minlength=256).double()
    expected = values.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _ks_uniform(values: torch.Tensor, modulus: int) -> float:
    u = (values.double() / modulus).sort().values
    n = u.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(grid - u, u - (grid - 1 / n)).max())


def test_a_masked_input_is_uniform_whatever_the_input() -> None:
    """What the server sees of one party is uniform mod 2**k for very different inputs: the
    byte histogram passes a χ² test and the whole value a KS test, at fixed seeds, where the
    unmasked quantized inputs fail both by far."""
    length = 30_000
    critical_chi = 255 * (1 - 2 / (9 * 255) + 3.72 * math.sqrt(2 / (9 * 255))) ** 3  # p = 1e-4
    critical_ks = 1.95 / math.sqrt(length)  # p = 1e-3
    for seed, value in ((1, -1.0), (2, 1.0), (3, 0.0)):
        run = Run(3, length=length, seed=seed, bits=13, consistency_check=False)
        run.inputs["site-1"] = torch.full((length,), value, dtype=torch.float64)
        run.advertise(), run.share()
        request = run.server.masked_input_requests()["site-1"]
        masked = run.clients["site-1"].masked_input(request, run.inputs["site-1"])["masked"]
        modulus = run.config.quantizer(3).modulus
        assert modulus == 2**16
        assert _chi_square_bytes(masked) < critical_chi
        assert _ks_uniform(masked, modulus) < critical_ks
        plain = run.config.quantizer(3).quantize(run.inputs["site-1"])
        assert _chi_square_bytes(plain) > 100 * critical_chi
        assert _ks_uniform(plain, modulus) > 10 * critical_ks


def test_the_worst_case_inputs_do_not_overflow_through_the_protocol() -> None:
    for value in (1.0, 50.0, -1.0, -50.0):  # at the bound and far beyond it (clipped)
        run = Run(10, length=8, bits=30)
        run.inputs = {p: torch.full((8,), value, dtype=torch.float64) for p in run.parties}
        result = run.run()
        bound = run.config.quantizer(10).error_bound(10)
        assert (result - math.copysign(10.0, value)).abs().max().item() <= bound


def test_a_weighted_mean_through_the_protocol() -> None:
    clip, n, length = 0.5, 6, 40
    run = Run(n, length=length + 1, bits=28)
    run.config = SecAggConfig(run.config.session, length + 1, weighted_bound(1.0), bits=28)
    g = torch.Generator().manual_seed(9)
    weights = {p: float(torch.rand(1, generator=g)) for p in run.parties}
    updates = {p: (torch.rand(length, generator=g) * 2 - 1) * clip for p in run.parties}
    run.inputs = {p: pack_weighted(updates[p], weights[p], clip) for p in run.parties}
    wx, w = unpack_weighted(run.run(), clip)
    assert w == pytest.approx(sum(weights.values()), abs=n / (2**28 - 1))
    true = sum(weights[p] * updates[p].double() for p in run.parties)
    assert (wx - true).abs().max().item() <= n * clip / (2**28 - 1) * (1 + 1e-9)
    mean = wx / w
    assert (mean - true / sum(weights.values())).abs().max().item() < 1e-6


def test_stochastic_rounding_through_the_protocol() -> None:
    run = Run(5, bits=12, stochastic_rounding=True)
    result = run.run()
    bound = run.config.quantizer(5).error_bound(5, stochastic=True)
    assert (result - run.expected()).abs().max().item() <= bound


def test_sessions_are_reproducible_with_seeded_randomness() -> None:
    def masked(seed: int) -> torch.Tensor:
        run = Run(3, seed=0)
        run.clients["site-1"]._rng = random.Random(seed)
        run.advertise(), run.share()
        request = run.server.masked_input_requests()["site-1"]
        return run.clients["site-1"].masked_input(request, run.inputs["site-1"])["masked"]

    assert torch.equal(masked(1), masked(1))
    assert not torch.equal(masked(1), masked(2))


def test_bad_shares_in_round_3_are_detected() -> None:
    run = Run(5, consistency_check=False)
    run.advertise(), run.share(), run.mask(["site-5"])
    request = run.server.unmask_request()
    answers = {p: run.clients[p].unmask(request) for p in run.server.survivors}
    # a well-formed wrong share (y + 1): it interpolates to a wrong key, not to garbage
    y = shamir.decode_value(base64.b64decode(answers["site-1"]["s_shares"]["site-5"]))
    answers["site-1"]["s_shares"]["site-5"] = b64(shamir.encode_value(y + 1))
    for answer in answers.values():
        run.server.receive_unmask(answer)
    with pytest.raises(SecAggError, match="shares of site-5's mask key do not give the key it"):
        run.server.result()
    run = Run(5, consistency_check=False)
    run.advertise(), run.share(), run.mask()
    request = run.server.unmask_request()
    answers = {p: run.clients[p].unmask(request) for p in run.server.survivors}
    answers["site-1"]["b_shares"]["site-2"] = b64(shamir.encode_value(12345))  # garbage
    for answer in answers.values():
        run.server.receive_unmask(answer)
    with pytest.raises(SecAggError, match="round 3: site-2's self-mask seed: .*inconsistent"):
        run.server.result()


# ------------------------------------------------------------ parameters and bad messages


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"session": ""}, "session id"),
        ({"session": "a\nb"}, "session id"),
        ({"session": "s" * 256}, "session id"),
        ({"length": 0}, "length"),
        ({"length": 2**31}, "length"),
        ({"length": 3.0}, "length"),
        ({"bound": 0}, "bound"),
        ({"bits": 60}, "bits"),
        ({"threshold": 1}, "threshold must be an integer ≥ 2"),
        ({"threshold": 2.5}, "threshold"),
        ({"neighbours": 3}, "even number"),
        ({"neighbours": 0}, "even number"),
        ({"neighbours": 4, "threshold": 6}, "more than a share group holds"),
        ({"stochastic_rounding": 1}, "true or false"),
        ({"consistency_check": "yes"}, "true or false"),
    ],
)
def test_config_refuses_parameters_that_cannot_work(kwargs, match) -> None:
    args = {"session": "s", "length": 10, "bound": 1.0} | kwargs
    with pytest.raises(SecAggConfigError, match=match):
        SecAggConfig(**args)


def test_config_derives_group_threshold_and_quantizer_from_the_roster() -> None:
    full = SecAggConfig("s", 10, 2.0, bits=16)
    assert full.group_size(10) == 10 and full.threshold_for(10) == 6
    assert full.quantizer(10) == Quantizer(2.0, 16, 10)
    plus = SecAggConfig("s", 10, 2.0, neighbours=6, threshold=5)
    assert plus.group_size(100) == 7 and plus.threshold_for(100) == 5
    assert plus.group_size(5) == 5  # fewer parties than neighbours: everyone
    assert plus.public()["neighbours"] == 6 and SecAggConfig(**plus.public()) == plus
    with pytest.raises(SecAggConfigError, match="SecAggConfig"):
        SecAggServer({"session": "s"})  # type: ignore[arg-type]
    with pytest.raises(SecAggConfigError, match="SecAggConfig"):
        SecAggClient("a", None, bytes, lambda *a: True)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="party id"):
        SecAggClient("", full, bytes, lambda *a: True)


def test_one_party_is_not_a_secure_aggregation() -> None:
    run = Run(1)
    with pytest.raises(SecAggError, match="round 0: 1 party advertised keys, 2 are required"):
        run.run()


def test_the_server_refuses_messages_out_of_turn_twice_or_malformed() -> None:
    run = Run(4, consistency_check=False)
    server = run.server
    ad = run.clients["site-1"].advertise()
    for bad, match in [
        ("not a mapping", "a message is a mapping"),
        (dict(ad, kind="secagg/shares"), "expected a 'secagg/advertise' message"),
        (dict(ad, session="other"), "for session 'other'"),
        (dict(ad, extra=1), r"unexpected fields \['extra'\]"),
        ({k: v for k, v in ad.items() if k != "sig"}, r"missing fields \['sig'\]"),
        (dict(ad, c_pk="!!!"), "c_pk is not base64"),
        (dict(ad, s_pk=b64(b"short")), "s_pk is 5 bytes, not 32"),
        (dict(ad, s_pk=123), "must be a base64 string"),
        (dict(ad, sig=""), "signature is 0 bytes"),
        (dict(ad, sig="A" * 5000), "base64 string"),
        (dict(ad, party="a\x00b"), "printable"),
    ]:
        with pytest.raises(SecAggError, match=match):
            server.receive_advertisement(bad)
    server.receive_advertisement(ad)
    with pytest.raises(SecAggError, match="site-1 already advertised"):
        server.receive_advertisement(ad)
    with pytest.raises(SecAggError, match="round 1: out of turn"):
        server.receive_shares({})
    with pytest.raises(SecAggError, match="round 1: out of turn"):
        server.masked_input_requests()
    run.advertise(["site-1"])
    request = server.share_keys_request()
    assert server.pending == sorted(run.parties)
    with pytest.raises(SecAggError, match="round 0: out of turn"):
        server.receive_advertisement(ad)
    shares = run.clients["site-1"].share_keys(request)
    with pytest.raises(SecAggError, match="not in the roster"):
        server.receive_shares(dict(shares, party="site-9"))
    with pytest.raises(SecAggError, match="exactly its 3 neighbours"):
        server.receive_shares(dict(shares, shares=dict(list(shares["shares"].items())[:2])))
    with pytest.raises(SecAggError, match="bytes, not"):
        server.receive_shares(dict(shares, shares=dict.fromkeys(shares["shares"], b64(b"x"))))
    with pytest.raises(SecAggError, match="at most"):
        server.receive_shares(dict(shares, shares=["site-2"]))
    server.receive_shares(shares)
    with pytest.raises(SecAggError, match="site-1 already sent its shares"):
        server.receive_shares(shares)
    for p in ("site-2", "site-3"):
        server.receive_shares(run.clients[p].share_keys(request))
    assert server.pending == ["site-4"] and server.shared == ["site-1", "site-2", "site-3"]
    requests = server.masked_input_requests()  # site-4 dropped: it gets none
    assert set(requests) == {"site-1", "site-2", "site-3"}
    masked = run.clients["site-1"].masked_input(requests["site-1"], run.inputs["site-1"])
    y = masked["masked"]
    for bad, match in [
        (dict(masked, party="site-4"), "site-4 did not take part in round 1"),
        (dict(masked, masked=y.float()), "int64 tensor of shape"),
        (dict(masked, masked=y[:-1]), "int64 tensor of shape"),
        (dict(masked, masked=y.tolist()), "int64 tensor of shape"),
        (dict(masked, masked=y - y - 1), r"outside \[0, 2\*\*23\)"),
        (dict(masked, masked=y * 0 + 2**23), r"outside \[0, 2\*\*23\)"),
    ]:
        with pytest.raises(SecAggError, match=match):
            server.receive_masked_input(bad)
    server.receive_masked_input(masked)
    with pytest.raises(SecAggError, match="already sent its masked input"):
        server.receive_masked_input(masked)
    for p in ("site-2", "site-3"):
        server.receive_masked_input(run.clients[p].masked_input(requests[p], run.inputs[p]))
    request = server.unmask_request()
    assert server.dropped == [] and server.pending == ["site-1", "site-2", "site-3"]
    answer = run.clients["site-1"].unmask(request)
    with pytest.raises(SecAggError, match="site-4 is not a survivor"):
        server.receive_unmask(dict(answer, party="site-4"))
    with pytest.raises(SecAggError, match="exactly 3 survivors and 0 dropped"):
        server.receive_unmask(dict(answer, b_shares={}))
    with pytest.raises(SecAggError, match="66"):
        server.receive_unmask(dict(answer, b_shares=dict.fromkeys(answer["b_shares"], b64(b"1"))))
    server.receive_unmask(answer)
    with pytest.raises(SecAggError, match="already sent its shares"):
        server.receive_unmask(answer)
    for p in ("site-2", "site-3"):  # t = 3 of the roster of 4
        server.receive_unmask(run.clients[p].unmask(request))
    run.check(server.result())
    assert server.state == "done" and server.pending == []
    with pytest.raises(SecAggError, match="out of turn .the session is at 'done'"):
        server.result()


def test_the_client_refuses_requests_out_of_turn_or_malformed() -> None:
    run = Run(4, consistency_check=False)
    client = run.clients["site-1"]
    with pytest.raises(SecAggError, match="round 1: out of turn .this party is at 'new'"):
        client.share_keys({})
    run.advertise()
    with pytest.raises(SecAggError, match="round 0: out of turn"):
        client.advertise()
    request = run.server.share_keys_request()
    for bad, match in [
        (dict(request, roster="x"), "roster must be a list"),
        (dict(request, roster=[{"party": "x"}]), "a roster entry is"),
        (dict(request, roster=["x"]), "a roster entry is"),
    ]:
        with pytest.raises(SecAggError, match=match):
            client.share_keys(bad)
    for p in run.parties:
        run.server.receive_shares(run.clients[p].share_keys(request))
    requests = run.server.masked_input_requests()
    mine = requests["site-1"]
    x = run.inputs["site-1"]
    for bad, values, match in [
        (dict(mine, shares={"site-9": "x"}), x, "site-9.*not a neighbour"),
        (dict(mine, shares={"site-2": b64(b"x")}), x, "bytes, not"),
        (dict(mine, shares={}), x, "round 2: 1 of the 3 required parties"),
        (mine, x[:-1], "a tensor of 48 values, got 47"),
        (mine, x.tolist(), "a tensor of 48 values, got list"),
        (mine, x * math.nan, "NaN"),
    ]:
        with pytest.raises(SecAggError, match=match):
            client.masked_input(bad, values)
    masked = client.masked_input(mine, x.reshape(6, 8))  # any shape of 48 values
    assert masked["masked"].shape == (48,)
    run.server.receive_masked_input(masked)
    with pytest.raises(SecAggError, match="round 2: out of turn"):
        client.masked_input(mine, x)
    for p in ("site-2", "site-3", "site-4"):
        run.server.receive_masked_input(run.clients[p].masked_input(requests[p], run.inputs[p]))
    request = run.server.unmask_request()
    for bad, match in [
        (dict(request, survivors=[*request["survivors"], "site-9"]), "site-9.*not in the roster"),
        (dict(request, dropped=["site-9"]), "site-9.*not in the roster"),
        (dict(request, survivors=["site-2", "site-3", "site-4"]), "not among the survivors"),
        (dict(request, survivors=["site-1", "site-1"]), "names a party twice"),
        (dict(request, survivors="site-1"), "must be a list"),
        (dict(request, survivors=["site-1", "site-2", "site-3"]), "site-4, whose mask is in"),
    ]:
        with pytest.raises(SecAggError, match=match):
            client.unmask(bad)
    answer = client.unmask(request)
    assert set(answer["b_shares"]) == set(run.parties) and answer["s_shares"] == {}
    assert client.state == "done"
    with pytest.raises(SecAggError, match="round 3: out of turn"):
        client.unmask(request)  # once only: a second request could ask for the other kind


def test_a_sign_callable_that_returns_no_signature_is_an_error() -> None:
    config = SecAggConfig("s", 4, 1.0)
    client = SecAggClient("a", config, lambda m: "sig", lambda *a: True)  # type: ignore[arg-type,return-value]
    with pytest.raises(SecAggError, match="sign.. must return"):
        client.advertise()


def test_a_dropped_party_whose_neighbours_all_left_needs_no_unmasking() -> None:
    run = Run(20, length=16, neighbours=4, threshold=2)
    run.advertise()
    request = run.server.share_keys_request()
    lonely = run.server._roster.neighbours["site-1"]  # they leave before sharing
    for p in run.server.roster:
        if p not in lonely:
            run.server.receive_shares(run.clients[p].share_keys(request))
    run.mask(["site-1"]), run.confirm(), run.unmask()
    run.check(run.server.result())
    assert run.server.dropped == ["site-1"] and len(run.server.survivors) == 15


def test_the_server_tracks_who_it_waits_for_and_caps_the_roster(monkeypatch) -> None:
    run = Run(3)
    run.advertise(), run.share()
    requests = run.server.masked_input_requests()
    assert run.server.pending == ["site-1", "site-2", "site-3"]
    p = "site-2"
    run.server.receive_masked_input(run.clients[p].masked_input(requests[p], run.inputs[p]))
    assert run.server.pending == ["site-1", "site-3"]
    p = "site-1"
    run.server.receive_masked_input(run.clients[p].masked_input(requests[p], run.inputs[p]))
    request = run.server.consistency_request()
    assert run.server.pending == ["site-1", "site-2"]
    run.server.receive_confirmation(run.clients["site-1"].confirm(request))
    assert run.server.pending == ["site-2"]
    run = Run(3)
    monkeypatch.setattr("fedctl.privacy.secagg.server.MAX_PARTIES", 2)
    with pytest.raises(SecAggError, match="at most 2 parties"):
        run.advertise()


def test_a_confirming_sign_callable_that_returns_no_signature_is_an_error() -> None:
    run = Run(3)
    run.advertise(), run.share(), run.mask()
    request = run.server.consistency_request()
    run.clients["site-1"]._sign = lambda m: None  # type: ignore[assignment,return-value]
    with pytest.raises(SecAggError, match="consistency check: sign.. must return"):
        run.clients["site-1"].confirm(request)


def test_shares_of_a_secret_of_the_wrong_size_are_refused() -> None:
    run = Run(3, consistency_check=False)
    run.advertise(), run.share(), run.mask()
    request = run.server.unmask_request()
    x = run.server._roster.x
    fake = dict(shamir.split(b"short", 3, 2, random.Random(0), xs=[x[p] for p in run.parties]))
    for p in run.parties:
        answer = run.clients[p].unmask(request)
        answer["b_shares"]["site-2"] = b64(shamir.encode_value(fake[x[p]]))
        run.server.receive_unmask(answer)
    with pytest.raises(SecAggError, match="site-2's self-mask seed is 5 bytes, not 32"):
        run.server.result()


def test_with_neighbourhoods_each_share_group_must_sign_the_survivors() -> None:
    """t signatures from anywhere would be easy to get twice in a sparse graph: what protects
    a party is that t holders of its shares saw the same list."""
    run = Run(20, length=8, neighbours=4)  # t = 3 of a group of 5
    run.advertise(), run.share(), run.mask()
    request = run.server.consistency_request()
    group = sorted(run.server._roster.group("site-1"))
    silent = group[:3]  # 2 of site-1's group sign, 15 parties elsewhere do
    for p in run.server.survivors:
        if p not in silent:
            run.server.receive_confirmation(run.clients[p].confirm(request))
    with pytest.raises(
        SecAggError, match="consistency check: 2 of the 3 required signatures from site-1's share"
    ):
        run.server.unmask_request()
    # a server that asks anyway is refused by the holders of site-1's shares
    forged = {
        "kind": "secagg/unmask",
        "session": run.config.session,
        "survivors": run.server.survivors,
        "dropped": [],
        "signatures": {p: b64(s) for p, s in run.server._confirmations.items()},
    }
    with pytest.raises(SecAggError, match="of the 3 required signatures on the list of survivors"):
        run.clients[group[3]].unmask(forged)


def test_components_of_the_survivors_graph() -> None:
    parties = [f"p{i:02d}" for i in range(12)]
    ring = {
        p: frozenset({parties[(i - 1) % 12], parties[(i + 1) % 12]}) for i, p in enumerate(parties)
    }
    assert graph.components(ring, parties) == [parties]
    cut = [p for i, p in enumerate(parties) if i not in (0, 6)]
    assert graph.components(ring, cut) == [parties[1:6], parties[7:]]
    assert graph.components(ring, []) == []


def _ring_order(run: Run) -> list[str]:
    roster = run.server._roster
    entries = [(e.party, e.c_pk, e.s_pk) for e in roster.entries.values()]
    seed = graph.roster_seed(run.config.session, entries)
    key = lambda p: hashlib.sha256(seed + masking.encode_fields(p)).digest()  # noqa: E731
    return sorted(roster.parties, key=key)


def test_survivors_whose_masks_fall_apart_are_refused() -> None:
    """With neighbourhoods, survivors that no mask joins could be unmasked group by group:
    a server that declares the right parties dropped would learn sums of a few parties."""
    run = Run(20, length=8, neighbours=4)  # a ring; each party masks with 2 on either side
    run.advertise(), run.share()
    ring = _ring_order(run)
    cut = {ring[0], ring[1], ring[10], ring[11]}  # two gaps of 2: two halves of 8
    run.mask(cut)
    with pytest.raises(
        SecAggError, match=r"round 2: the 16 survivors fall into 2 groups .*\(sizes 8, 8\)"
    ):
        run.server.consistency_request()
    forged = {
        "kind": "secagg/consistency",
        "session": run.config.session,
        "survivors": sorted(set(run.parties) - cut),
    }
    with pytest.raises(SecAggError, match="consistency check: the 16 survivors fall into 2"):
        run.clients[ring[5]].confirm(forged)
    # one gap leaves the ring in one piece: fine
    run = Run(20, length=8, neighbours=4)
    run.advertise(), run.share()
    ring = _ring_order(run)
    run.mask(ring[3:5]), run.confirm(), run.unmask()
    run.check(run.server.result())
    assert len(run.server.survivors) == 18
