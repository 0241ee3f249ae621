"""Memory and time of each aggregator as the number of results per round grows.

    python bench/bench_aggregators.py            # a 1M-parameter model, 10 / 30 / 60 results
    python bench/bench_aggregators.py --quick    # a 100k-parameter model, 5 / 10 results

The weighted mean folds each update into one accumulator as it arrives (memory O(model),
whatever N); the robust aggregators keep every update of the round (memory O(N × model)) and
Krum/Bulyan also compute N² distances. "held" is what the aggregator holds just before
``result()`` (the peak), as a multiple of the model's own size; "add" is the mean time to take
one result and "result" the time to combine them. Prints figures; asserts nothing.

"mean, one mixed add_" is the weighted mean as it was before float32 updates were converted
into float64 in slices: one mixed-dtype ``add_`` per tensor, slow on large tensors. Its row
beside "mean" is that change's effect, measured in the same run (visible with tensors over
1M elements, e.g. ``--params 100000000 --results 4``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPECS = [
    ("mean", None),
    ("mean, one mixed add_", None),
    ("median", "median"),
    ("trimmed_mean", {"name": "trimmed_mean", "beta": 0.1}),
    ("krum", {"name": "krum", "f": 1}),
    ("multi_krum", {"name": "multi_krum", "f": 1}),
    ("bulyan", {"name": "bulyan", "f": 1}),
]


def held_bytes(agg) -> int:
    """Bytes of update data the aggregator holds now."""
    if hasattr(agg, "nbytes"):
        return agg.nbytes
    return sum(t.numel() * t.element_size() for t in agg._acc.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="model size (float32)")
    parser.add_argument("--results", default="10,30,60", help="results per round to try")
    parser.add_argument("--precision", default="float64", choices=["float64", "float32"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.params, args.results = 100_000, "5,10"

    import torch

    from fedctl.aggregators import make_aggregator, min_results, weighted

    torch.set_num_threads(1)
    shapes = {"a": (args.params // 2,), "b": (args.params - args.params // 2,)}
    global_params = {k: torch.zeros(s) for k, s in shapes.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in global_params.values())
    gen = torch.Generator().manual_seed(0)
    print(
        f"aggregators: {args.params:,} float32 parameters ({model_bytes / 2**20:.1f} MiB), "
        f"accumulators in {args.precision}"
    )
    print("| aggregator | results | held (MiB) | held / model | add (ms) | result (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(x) for x in args.results.split(",")):
        updates = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
        for name, spec in SPECS:
            if n < min_results(spec):
                continue
            agg = make_aggregator(spec, global_params, args.precision)
            sliced = weighted._MIX_SLICE
            if name == "mean, one mixed add_":
                weighted._MIX_SLICE = 1 << 62  # no tensor is larger: one add_ each
            try:
                t0 = time.perf_counter()
                for i in range(n):
                    agg.add(updates[i % 3], 1.0, validate=False)
                t_add = (time.perf_counter() - t0) / n
            finally:
                weighted._MIX_SLICE = sliced
            held = held_bytes(agg)
            t1 = time.perf_counter()
            agg.result()
            t_res = time.perf_counter() - t1
            print(
                f"| {name} | {n} | {held / 2**20:.1f} | {held / model_bytes:.1f}x | "
                f"{t_add * 1e3:.2f} | {t_res * 1e3:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
