"""Per-round cost of homomorphic encryption (CKKS, TenSEAL) against plain FedAvg.

    python bench/bench_he.py            # 1M and 10M float32 parameters, 10 and 100 sites
    python bench/bench_he.py --quick    # 100k parameters, 3 and 10 sites

For each model size, in this process, on one thread, with the default parameters (N = 8192,
primes [60, 40, 60], scale 2^40):

* a site encrypts its weighted update (``encrypt_params``, every tensor encrypted): time, and
  the bytes it uploads against the plaintext float32 bytes;
* the server (public context only) folds the sites' uploads into its running sum with
  ``HEMean.add``: time per site, and the round's total; the sum it holds (ciphertexts in
  memory) and the growth of the process's RSS while aggregating; ``result()`` (serializing the
  sum); all sites upload the same bytes (the server's work does not depend on the values);
* a site decrypts the aggregate (``decrypt_params``): time, and the largest error against
  the plain weighted mean;
* plain FedAvg for comparison: ``WeightedAggregator.add`` per site (float64 accumulator).

Server adds are measured for up to ``--max-adds`` sites a size (by default as many as fit
in about 200M folded values); a round with more sites is extrapolated from the measured mean
and marked with ``~``. Prints a markdown table; asserts only that the mean came out right.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 2**20


def rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def model(size: int, seed: int):  # type: ignore[no-untyped-def]
    """``size`` float32 parameters in four tensors (two large, two small)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a, b = size * 6 // 10, size * 4 // 10 - 1000
    return {
        "layer1.weight": torch.randn(a, generator=g),
        "layer2.weight": torch.randn(b, generator=g),
        "layer1.bias": torch.randn(600, generator=g),
        "layer2.bias": torch.randn(size - a - b - 600, generator=g),
    }


def g(x: float) -> str:
    """Three significant digits, without an exponent for the usual range."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def run_size(size: int, sites: list[int], max_adds: int | None) -> list[str]:
    from fedctl.aggregators.he import HEMean
    from fedctl.aggregators.weighted import WeightedAggregator
    from fedctl.privacy.he import (
        decrypt_params,
        describe_params,
        encrypt_params,
        generate_context,
        load_context,
        public_context,
    )

    secret = generate_context()
    site = load_context(secret, need_secret=True)
    server = load_context(public_context(secret), need_secret=False)
    glob, update = model(size, 0), model(size, 1)
    plain_bytes = 4 * size

    t0 = time.perf_counter()
    upload, _ = encrypt_params(update, None, site, 1.0)
    t_enc = time.perf_counter() - t0
    up_bytes = sum(t.numel() for t in upload.values())

    n_max = max(sites)
    measured = min(n_max, max_adds or max(3, 200_000_000 // size))
    agg = HEMean(glob, describe_params(glob, None, server), server)
    base = rss()
    adds = []
    for _ in range(measured):
        t0 = time.perf_counter()
        agg.add(upload, 1.0)
        adds.append(time.perf_counter() - t0)
    peak = rss()
    held = sum(spec.count for spec in agg.description.tensors.values())
    held *= 2 * server.params.poly_modulus_degree * (len(server.params.coeff_mod_bit_sizes) - 1) * 8
    t0 = time.perf_counter()
    out = agg.result()
    t_res = time.perf_counter() - t0
    peak = max(peak, rss())
    t0 = time.perf_counter()
    mean = decrypt_params(out, agg.result_description, site)
    t_dec = time.perf_counter() - t0
    err = max(float((mean[k].double() - update[k].double()).abs().max()) for k in update)
    assert err < 1e-5, f"the encrypted mean is off by {err}"
    del out, mean

    plain = WeightedAggregator(glob)
    t0 = time.perf_counter()
    for _ in range(5):
        plain.add(update, 1.0, validate=False)
    t_plain = (time.perf_counter() - t0) / 5

    rows = []
    per_add = sum(adds) / len(adds)
    for n in sites:
        total = g(sum(adds[:n])) if n <= measured else f"~{g(per_add * n)}"
        rows.append(
            f"| {size / 1e6:g}M | {n} | {g(t_enc)} | {g(up_bytes / MiB)} | "
            f"{up_bytes / plain_bytes:.1f}x | {g(per_add)} | {total} | {g(t_res)} | "
            f"{g(held / MiB)} | {g((peak - base) / MiB)} | {g(t_dec)} | {err:.0e} | "
            f"{g(t_plain * 1e3)} |"
        )
    if measured < n_max:
        rows.append(
            f"<!-- {size / 1e6:g}M: server adds measured for {measured} sites, the rest "
            "extrapolated (~) -->"
        )
    print("\n".join(rows), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="float32 parameters")
    parser.add_argument("--sites", default="10,100", help="sites per round")
    parser.add_argument("--max-adds", type=int, default=None, help="server adds to measure")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.sites = "100000", "3,10"

    import torch

    from fedctl.privacy.he import HEParams

    torch.set_num_threads(1)
    sizes = [int(x) for x in args.sizes.split(",")]
    sites = sorted(int(x) for x in args.sites.split(","))
    print(f"HE bench: {HEParams().describe()}, one thread; {' '.join(sys.argv)}")
    print(
        "| params | sites | site encrypt (s) | upload per site (MiB) | vs float32 | "
        "server add per site (s) | server adds, round (s) | server result (s) | "
        "sum held (MiB) | server RSS growth (MiB) | site decrypt (s) | max error | "
        "plain FedAvg add per site (ms) |"
    )
    print("|" + " ---: |" * 13)
    for size in sizes:
        run_size(size, sites, args.max_adds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
