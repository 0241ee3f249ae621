"""Secure aggregation (fedctl.privacy.secagg): Shamir sharing, quantization, masks, the sealed
share envelopes, the neighbourhood graph, and whole sessions of in-memory parties — sums,
dropouts at every point, forged keys, a server that equivocates, and what the server sees."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedctl.privacy.secagg import channel, graph, masking, shamir
from fedctl.privacy.secagg.errors import SecAggConfigError, SecAggError
from fedctl.privacy.secagg.quantize import (
    Quantizer,
    pack_weighted,
    unpack_weighted,
    weighted_bound,
)

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
    values = {p: torch.randint(0, 2**20, (n,), generator=torch.Generator().manual_seed(i))
              for i, p in enumerate("abc")}  # fmt: skip
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
