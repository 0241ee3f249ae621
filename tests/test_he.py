"""Homomorphic encryption (fedctl.privacy.he, aggregators.he): round trips and aggregates within
CKKS error, per-key selection, a server that holds only the public context, hostile input.

Error bounds asserted: each value of a fresh encryption of ``w·x`` is off by at most
``HEParams.error_bound`` (the fresh-noise bound of Cheon-Kim-Kim-Song plus encoding rounding,
over the 2^40 scale: 6.6e-7 at N = 8192; seen in practice: ~1e-8). Ciphertext addition adds
no error, so a sum of K uploads is off by at most K·bound, and the mean (sum / Σw, divided in
float64 after decryption) by K·bound/Σw, plus the rounding to the tensor's dtype.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from fedctl.aggregators.weighted import AggregateUnusable, UpdateRejected, WeightedAggregator
from fedctl.codec.model import ParamsType
from fedctl.errors import UsageError

if TYPE_CHECKING:
    from fedctl.privacy.he import HEContext

HAVE_TENSEAL = importlib.util.find_spec("tenseal") is not None
needs_he = pytest.mark.skipif(not HAVE_TENSEAL, reason="TenSEAL is not installed")
MISSING = "homomorphic encryption needs TenSEAL: pip install 'fedctl[he]'"


def test_tenseal_is_installed_where_ci_requires_it() -> None:
    if os.environ.get("FEDCTL_REQUIRE_HE") != "1":
        pytest.skip("FEDCTL_REQUIRE_HE is not set")
    assert HAVE_TENSEAL, "FEDCTL_REQUIRE_HE=1 but TenSEAL is not importable: pip install '.[he]'"


def test_without_tenseal_every_entry_point_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedctl.privacy.he as he

    monkeypatch.setitem(sys.modules, "tenseal", None)  # `import tenseal` raises ImportError
    calls = [
        he.generate_context,
        lambda: he.public_context(b"anything"),
        lambda: he.load_context(b"anything", need_secret=True),
        lambda: he.encrypt_params({"w": torch.ones(2)}, None, None, 1.0),
        lambda: he.decrypt_params({}, {}, None),
    ]
    for call in calls:
        with pytest.raises(UsageError) as err:
            call()
        assert str(err.value) == MISSING


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    from fedctl.privacy.he import generate_context, public_context

    secret = generate_context()
    return secret, public_context(secret)


@pytest.fixture(scope="module")
def site(keys: tuple[bytes, bytes]) -> HEContext:
    from fedctl.privacy.he import load_context

    return load_context(keys[0], need_secret=True)


@pytest.fixture(scope="module")
def server(keys: tuple[bytes, bytes]) -> HEContext:
    from fedctl.privacy.he import load_context

    return load_context(keys[1], need_secret=False)


def model(seed: int) -> dict[str, torch.Tensor]:
    """A small model: two encrypted-sized tensors (one over two ciphertexts), plain ones."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(6, 1, 30, 30, generator=g),  # 5400 values: 2 ciphertexts
        "conv.bias": torch.randn(6, generator=g).double(),
        "fc.weight": torch.randn(10, 50, generator=g) * 5,
        "fc.bias": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


ENCRYPTED = ["conv.weight", "conv.bias", "fc.weight"]


def rounding(t: torch.Tensor) -> torch.Tensor:
    """Half an ulp of each value in its dtype (rounding a float64 result to it)."""
    if not t.is_floating_point():
        return torch.zeros(t.shape, dtype=torch.float64)
    return t.double().abs() * torch.finfo(t.dtype).eps / 2


# --------------------------------------------------------------------------- round trips


@needs_he
@pytest.mark.parametrize("weight", [1.0, 37.5])
def test_round_trip_is_within_ckks_error(site: HEContext, weight: float) -> None:
    from fedctl.privacy.he import HE_META_KEY, decrypt_params, encrypt_params

    params = model(0)
    before = {k: v.clone() for k, v in params.items()}
    params["half"] = torch.linspace(-2, 2, 100, dtype=torch.float16)
    params["brain"] = torch.linspace(-2, 2, 100, dtype=torch.bfloat16)
    enc, desc = encrypt_params(params, None, site, weight)
    assert HE_META_KEY == "he" and desc["divisor"] == weight
    assert sorted(desc["tensors"]) == sorted({*params} - {"bn.num_batches_tracked"})
    assert desc["tensors"]["conv.weight"] == {
        "shape": [6, 1, 30, 30],
        "dtype": "float32",
        "count": 2,
    }
    for name in desc["tensors"]:
        assert enc[name].dtype == torch.uint8 and enc[name].dim() == 1
    assert enc["bn.num_batches_tracked"] is params["bn.num_batches_tracked"]
    assert all(torch.equal(before[k], params[k]) for k in before)  # the caller's tensors unchanged
    dec = decrypt_params(enc, desc, site)
    bound = site.params.error_bound / weight  # the error is on w·x; decrypting divides by w
    assert 1e-7 < site.params.error_bound < 1e-6
    for name, x in params.items():
        assert dec[name].dtype == x.dtype and dec[name].shape == x.shape
        err = (dec[name].double() - x.double()).abs()
        assert bool((err <= bound + rounding(x)).all()), (name, float(err.max()))
    assert float((dec["conv.bias"] - params["conv.bias"]).abs().max()) <= bound  # float64


@needs_he
def test_per_key_selection_leaves_the_rest_untouched(site: HEContext) -> None:
    from fedctl.privacy.he import HEConfigError, encrypt_params

    params = model(1)
    enc, desc = encrypt_params(params, ["fc.weight"], site, 2.0)
    assert list(desc["tensors"]) == ["fc.weight"]
    assert all(enc[k] is params[k] for k in params if k != "fc.weight")
    with pytest.raises(
        HEConfigError, match=r"unknown parameter\(s\) 'fc.wieght' \(did you mean 'fc.weight'\?\)"
    ):
        encrypt_params(params, ["fc.wieght"], site, 1.0)
    with pytest.raises(HEConfigError, match="'bn.num_batches_tracked' is int64: only float64"):
        encrypt_params(params, ["bn.num_batches_tracked"], site, 1.0)
    with pytest.raises(HEConfigError, match="must be a list of parameter names"):
        encrypt_params(params, "fc.weight", site, 1.0)


@needs_he
def test_weight_is_applied_by_the_site(site: HEContext) -> None:
    from fedctl.privacy.he import decrypt_params, encrypt_params

    params = model(2)
    enc, desc = encrypt_params(params, ["fc.weight"], site, 1000.0)
    raw = decrypt_params(enc, {**desc, "divisor": 1.0}, site)["fc.weight"].double()
    assert float((raw - 1000 * params["fc.weight"].double()).abs().max()) < 1e-3


@needs_he
def test_values_the_parameters_cannot_sum_are_refused(site: HEContext) -> None:
    from fedctl.privacy.he import HEError, encrypt_params

    big = {"w": torch.full((3,), site.params.max_site_value / 10, dtype=torch.float64)}
    encrypt_params(big, None, site, 10.0)
    with pytest.raises(HEError, match="'w': \\|weight × value\\| reaches .* more than these HE"):
        encrypt_params(big, None, site, 11.0)
    with pytest.raises(HEError, match="'w': NaN or infinite values cannot be encrypted"):
        encrypt_params({"w": torch.tensor([1.0, float("nan")])}, None, site, 1.0)


# --------------------------------------------------------------------------- aggregation


def sites_and_weights(k: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    return [model(10 + i) for i in range(k)], [float(3 + 7 * i) for i in range(k - 1)] + [0.5]


@needs_he
@pytest.mark.parametrize("k", [3, 10])
def test_encrypted_mean_of_k_sites_matches_the_plain_weighted_mean(
    site: HEContext, server: HEContext, k: int
) -> None:
    from fedctl.aggregators.he import HEMean
    from fedctl.privacy.he import decrypt_params, describe_params, encrypt_params

    ups, ws = sites_and_weights(k)
    glob = model(0)
    agg = HEMean(glob, describe_params(glob, ENCRYPTED, server), server)
    plain = WeightedAggregator(glob)
    for p, w in zip(ups, ws, strict=True):
        enc, _ = encrypt_params(p, ENCRYPTED, site, w)
        agg.add(enc, w)
        plain.add(p, w)
    out, ref = agg.result(), plain.result()
    desc = agg.result_description
    assert desc is not None and desc["divisor"] == sum(ws) and agg.count == k
    for name in glob:
        if name not in ENCRYPTED:  # plain keys: exactly the weighted aggregator's result
            assert torch.equal(out[name], ref[name]), name
    dec = decrypt_params(out, desc, site)
    ref64 = {
        n: sum(w * p[n].double() for p, w in zip(ups, ws, strict=True)) / sum(ws) for n in ENCRYPTED
    }
    bound = k * site.params.error_bound / sum(ws)
    for name in ENCRYPTED:
        err = (dec[name].double() - ref64[name]).abs()
        assert bool((err <= bound + rounding(ref[name])).all()), (name, float(err.max()), bound)
        assert dec[name].dtype == glob[name].dtype


@needs_he
def test_next_round_starts_from_the_encrypted_aggregate(site: HEContext, server: HEContext) -> None:
    from fedctl.aggregators.he import HEMean
    from fedctl.privacy.he import decrypt_params, describe_params, encrypt_params

    glob = model(0)
    ups, ws = sites_and_weights(3)
    agg = HEMean(glob, describe_params(glob, ENCRYPTED, server), server)
    for p, w in zip(ups, ws, strict=True):
        agg.add(encrypt_params(p, ENCRYPTED, site, w)[0], w)
    glob2, desc2 = agg.result(), agg.result_description
    mean1 = decrypt_params(glob2, desc2, site)  # what every site trains from in round 2
    agg2 = HEMean(glob2, desc2, server)  # the global model now holds ciphertexts
    for w in (1.0, 3.0):
        agg2.add(encrypt_params(mean1, ENCRYPTED, site, w)[0], w)
    mean2 = decrypt_params(agg2.result(), agg2.result_description, site)
    for name in ENCRYPTED:  # every site sent the same model: the mean is that model
        assert torch.allclose(mean2[name], mean1[name], atol=1e-5)


@needs_he
def test_the_server_side_holds_only_the_public_context(
    keys: tuple[bytes, bytes], site: HEContext, server: HEContext
) -> None:
    from fedctl.aggregators.he import HEMean
    from fedctl.privacy.he import (
        HEError,
        context_info,
        decrypt_params,
        describe_params,
        encrypt_params,
    )

    assert not server.has_secret_key and not server.ts_context.has_secret_key()
    assert not context_info(keys[1]).has_secret_key and server.key_id == site.key_id
    glob = model(0)
    with pytest.raises(UsageError, match="server, which must hold only the public context"):
        HEMean(glob, describe_params(glob, ENCRYPTED, site), site)
    agg = HEMean(glob, describe_params(glob, ENCRYPTED, server), server)
    agg.add(encrypt_params(glob, ENCRYPTED, site, 1.0)[0], 1.0)
    out = agg.result()
    with pytest.raises(HEError, match="this context holds no secret key: only sites can decrypt"):
        decrypt_params(out, agg.result_description, server)


@needs_he
def test_weights_of_zero(site: HEContext, server: HEContext) -> None:
    from fedctl.aggregators.he import HEMean
    from fedctl.privacy.he import decrypt_params, describe_params, encrypt_params

    glob = model(0)
    agg = HEMean(glob, describe_params(glob, ENCRYPTED, server), server)
    agg.add(encrypt_params(model(5), ENCRYPTED, site, 0.0)[0], 0.0)
    with pytest.raises(AggregateUnusable, match="no update with a positive weight"):
        agg.result()
    agg = HEMean(glob, describe_params(glob, ENCRYPTED, server), server)
    agg.add(encrypt_params(model(5), ENCRYPTED, site, 0.0)[0], 0.0)  # counted, adds nothing
    agg.add(encrypt_params(model(6), ENCRYPTED, site, 2.0)[0], 2.0)
    dec = decrypt_params(agg.result(), agg.result_description, site)
    assert agg.count == 2 and torch.allclose(dec["fc.weight"], model(6)["fc.weight"], atol=1e-5)


# --------------------------------------------------------------------------- hostile input


def _patched(t: torch.Tensor, at: int, value: int) -> torch.Tensor:
    t = t.clone()
    t[at] = value
    return t


def _hostile(
    site: HEContext, other_key: HEContext, other_params: HEContext
) -> dict[str, tuple[dict[str, torch.Tensor], ParamsType, float, str]]:
    """Name → (update, params type, weight, the reason it must be refused with)."""
    from fedctl.privacy.he import encrypt_params
    from fedctl.privacy.he.blob import blob_bound

    p = model(7)
    enc, _ = encrypt_params(p, ENCRYPTED, site, 1.0)
    cw = enc["conv.weight"]
    head = 24 + 4 * 2  # framing header and the two lengths
    ct1 = head + int.from_bytes(bytes(cw[24:28].tolist()), "little")
    foreign, _ = encrypt_params(p, ENCRYPTED, other_key, 1.0)
    other, _ = encrypt_params(p, ENCRYPTED, other_params, 1.0)
    other_cw = other["conv.weight"].clone()
    other_cw[4:20] = cw[4:20]  # claims our key id
    garbage = torch.cat([cw[:head], torch.randint(0, 256, (cw.numel() - head,), dtype=torch.uint8)])
    nan_bias = dict(enc, **{"fc.bias": torch.tensor([float("nan")] * 10)})

    def up(**kw: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**enc, **kw}

    full = ParamsType.FULL
    return {
        "truncated": (up(**{"conv.weight": cw[:-10]}), full, 1.0, "truncated or padded"),
        "padded": (up(**{"conv.weight": torch.cat([cw, cw[:10]])}), full, 1.0, "padded"),
        "oversized": (
            up(**{"conv.weight": torch.zeros(blob_bound(site, 2) + 1, dtype=torch.uint8)}),
            full,
            1.0,
            "more than 2 ciphertext\\(s\\) can take",
        ),
        "garbage": (
            up(**{"conv.weight": garbage}),
            full,
            1.0,
            "ciphertext 0: ciphertext does not load",
        ),
        "second ciphertext broken": (
            up(**{"conv.weight": _patched(cw, ct1, 0)}),
            full,
            1.0,
            "'conv.weight', ciphertext 1: ciphertext does not load",
        ),
        "another key": (
            up(**{"fc.weight": foreign["fc.weight"]}),
            full,
            1.0,
            "'fc.weight': encrypted under another key",
        ),
        "other parameters": (
            up(**{"conv.weight": other_cw}),
            full,
            1.0,
            "'conv.weight', ciphertext 0: ",
        ),
        "plain values": (
            up(**{"conv.weight": p["conv.weight"]}),
            full,
            1.0,
            "plain values of shape \\(6, 1, 30, 30\\) where a ciphertext is expected",
        ),
        "int tensor": (
            up(**{"fc.weight": torch.zeros(9, dtype=torch.int32)}),
            full,
            1.0,
            "torch.int32",
        ),
        "missing": (
            {k: v for k, v in enc.items() if k != "fc.weight"},
            full,
            1.0,
            "'fc.weight' missing",
        ),
        "count": (
            up(**{"conv.weight": enc["fc.weight"]}),
            full,
            1.0,
            "1 ciphertexts, the description says 2",
        ),
        "magic": (up(**{"conv.weight": _patched(cw, 0, 0)}), full, 1.0, "bad magic"),
        "key id flipped": (
            up(**{"conv.weight": _patched(cw, 5, int(cw[5]) ^ 1)}),
            full,
            1.0,
            "another key",
        ),
        "length table": (
            up(**{"conv.weight": _patched(cw, 27, 0x7F)}),
            full,
            1.0,
            "lengths add up",
        ),
        "diff": (enc, ParamsType.DIFF, 1.0, "DIFF update cannot be aggregated under encryption"),
        "weight": (enc, full, float("nan"), "aggregation weight must be a finite number"),
        "plain nan": (nan_bias, full, 1.0, "'fc.bias' contains NaN"),
    }


@needs_he
def test_hostile_updates_are_refused_per_site_and_leave_the_sum_as_it_was(
    site: HEContext, server: HEContext
) -> None:
    from fedctl.aggregators.he import HEMean
    from fedctl.privacy.he import describe_params, encrypt_params, generate_context, load_context

    other_key = load_context(generate_context(), need_secret=True)
    other_params = load_context(generate_context(8192, (50, 50, 60)), need_secret=True)
    glob = model(0)
    desc = describe_params(glob, ENCRYPTED, server)
    honest = [encrypt_params(model(20 + i), ENCRYPTED, site, 1.0 + i)[0] for i in range(3)]
    ref, agg = HEMean(glob, desc, server), HEMean(glob, desc, server)
    for i, up in enumerate(honest):
        ref.add(up, 1.0 + i)
    agg.add(honest[0], 1.0)
    for name, (update, ptype, weight, reason) in _hostile(site, other_key, other_params).items():
        with pytest.raises(UpdateRejected, match=reason) as err:
            agg.add(update, weight, ptype)
        assert "\n" not in str(err.value), name
    agg.add(honest[1], 2.0)
    agg.add(honest[2], 3.0)
    assert agg.count == 3 and agg.total_weight == 6.0
    got, want = agg.result(), ref.result()
    for name in glob:  # the refused updates left no trace, bit for bit
        assert torch.equal(got[name], want[name]), name


@needs_he
def test_decrypting_bad_input_names_the_problem(keys: tuple[bytes, bytes], site: HEContext) -> None:
    from fedctl.privacy.he import HEError, decrypt_params, encrypt_params, generate_context
    from fedctl.privacy.he import load_context as load

    enc, desc = encrypt_params(model(3), ENCRYPTED, site, 2.0)
    other = load(generate_context(), need_secret=True)
    cases = [
        (enc, None, site, "HE description: missing"),
        (enc, {**desc, "version": 9}, site, "version 9"),
        (enc, {**desc, "divisor": 0}, site, "divisor is 0"),
        (enc, {**desc, "divisor": float("inf")}, site, "divisor must be finite"),
        (enc, desc, other, "HE description: made under another key"),
        ({k: v for k, v in enc.items() if k != "fc.weight"}, desc, site, "'fc.weight': missing"),
        (
            {**enc, "fc.weight": enc["fc.weight"][:1000]},
            desc,
            site,
            "'fc.weight': ciphertext lengths",
        ),
        ({**enc, "fc.weight": model(3)["fc.weight"]}, desc, site, "'fc.weight': plain values"),
        (
            enc,
            {
                **desc,
                "tensors": {
                    **desc["tensors"],
                    "fc.weight": {"shape": [10**7], "dtype": "float32", "count": 2442},
                },
            },
            site,
            "'fc.weight': 1 ciphertexts, the description says 2442",
        ),
        (
            enc,
            {**desc, "tensors": {"fc.weight": {"shape": [500], "dtype": "float32", "count": 7}}},
            site,
            "'fc.weight': count 7, but shape \\[500\\] needs 1",
        ),
        (
            enc,
            {**desc, "tensors": {"fc.weight": {"shape": [500], "dtype": "int8", "count": 1}}},
            site,
            "dtype must be",
        ),
    ]
    for params, description, ctx, reason in cases:
        with pytest.raises(HEError, match=reason):
            decrypt_params(params, description, ctx)


@needs_he
def test_contexts_that_cannot_be_used_are_refused_in_one_line(keys: tuple[bytes, bytes]) -> None:
    from fedctl.privacy.he import HEConfigError, HEError, HEParams, generate_context, load_context
    from fedctl.privacy.he.context import MAGIC

    secret, public = keys
    body_at = secret.index(b"}") + 1  # the JSON header ends there
    cases = [
        (b"", "not a fedctl homomorphic-encryption context"),
        (b"PK\x03\x04 a zip", "not a fedctl homomorphic-encryption context"),
        (MAGIC + b"\x02" + secret[len(MAGIC) + 1 :], "context format version 2"),
        (secret[:40], "truncated or oversized context header"),
        (secret[:-100], "the TenSEAL context does not load"),
        (secret[:body_at] + public[public.index(b"}") + 1 :], "does not match its header"),
        (secret + b"\0" * 2_000_000, "more than .* these parameters ever need"),
    ]
    for data, reason in cases:
        with pytest.raises(HEError, match=reason) as err:
            load_context(data, need_secret=False)
        assert "\n" not in str(err.value)
    with pytest.raises(HEError, match="this context holds no secret key: only sites can decrypt"):
        load_context(public, need_secret=True)
    with pytest.raises(HEConfigError, match="poly_modulus_degree: must be one of 8192, 16384"):
        generate_context(4096)
    with pytest.raises(HEConfigError, match="global_scale_bits: must be 30-60, got 20"):
        HEParams.check(global_scale_bits=20)


CRASH_PROBE = """
import random, sys, torch
from fedctl.privacy.he import HEError, decrypt_params, encrypt_params, load_context
from fedctl.privacy.he.blob import load_vector
ctx = load_context(open(sys.argv[1], "rb").read(), need_secret=True)
enc, desc = encrypt_params({"w": torch.randn(5000)}, None, ctx, 1.0)
blob = enc["w"]
ct = bytes(blob[32 : 32 + int.from_bytes(bytes(blob[24:28].tolist()), "little")].tolist())
rng = random.Random(0)
refused = loaded = 0
for i in range(int(sys.argv[2])):
    kind = i % 4
    if kind == 0:
        data = rng.randbytes(rng.choice([0, 1, 16, 100, 4096, len(ct)]))
    elif kind == 1:
        data = ct[: rng.randrange(len(ct))]
    elif kind == 2:
        b = bytearray(ct)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(16)] = rng.randrange(256)
        data = bytes(b)
    else:
        b = bytearray(ct)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(16, len(b))] ^= 1 << rng.randrange(8)
        data = bytes(b)
    try:
        vec = load_vector(ctx, data, 4096, "probe")
        (vec + vec).decrypt()
        loaded += 1
    except HEError:
        refused += 1
print(refused, loaded)
"""


@needs_he
def test_hostile_ciphertext_bytes_never_crash_the_process(
    keys: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """Random, truncated and bit-flipped ciphertexts, in a child process (a segfault or abort
    would show as a signal): SEAL refuses most with an exception; flips deep in the data
    that keep every coefficient below its modulus load, and decrypt to other values."""
    path = tmp_path / "ctx"
    path.write_bytes(keys[0])
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_PROBE), str(path), "400"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    refused, loaded = map(int, res.stdout.split())
    assert refused + loaded == 400 and refused >= 300
