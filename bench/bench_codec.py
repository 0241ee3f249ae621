"""fedctl's tensor codec beside the safetensors library, on the same model, in one run.

Decides whether fedctl keeps its own implementation of the safetensors layout (issue 10): both
write and read a ~400 MB fp32 state_dict (and a 100-tensor ~40 MB one); the figures are the best
of three runs each, with the page cache warm (files in a temporary folder).

    python bench/bench_codec.py            # ~1 minute on 2 cores
    python bench/bench_codec.py --quick    # 40 MB only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def best(fn: Callable[[], Any], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def model(total_mb: int, tensors: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    per = total_mb * 2**20 // 4 // tensors
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(tensors)}


def main() -> int:
    import safetensors.torch as st
    import torch

    from fedctl.codec import tensorfiles as fc

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    cases = [("40 MB, 100 tensors", 40, 100)]
    if not args.quick:
        cases.insert(0, ("400 MB, 8 tensors", 400, 8))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-codec-") as tmp:
        for label, mb, n in cases:
            params = model(mb, n)
            size = sum(t.numel() * 4 for t in params.values())
            a, b = Path(tmp) / "fedctl.safetensors", Path(tmp) / "lib.safetensors"
            rows = {
                "write (no fsync)": (
                    best(lambda: fc.save_file(params, a, durable=False)),  # noqa: B023
                    best(lambda: st.save_file(params, str(b))),  # noqa: B023
                ),
                "write + SHA-256": (
                    best(lambda: fc.save_file_hashed(params, a, durable=False)),  # noqa: B023
                    best(lambda: (st.save_file(params, str(b)), _sha(b))),  # noqa: B023
                ),
                "read all and use it": (
                    best(lambda: _touch(fc.load_file(a)[0])),  # noqa: B023
                    best(lambda: _touch(st.load_file(str(b)))),  # noqa: B023
                ),
                "read one tensor lazily": (
                    best(lambda: _touch(fc.LazyTensorFile(a, 1 << 40)["layer0.weight"])),  # noqa: B023
                    best(lambda: _touch(_one(st, b))),  # noqa: B023
                ),
            }
            same = fc.load_file(b)[0]  # our reader reads the library's files...
            assert all(torch.equal(same[k], params[k]) for k in params)
            again = st.load_file(str(a))  # ...and the library reads ours
            assert all(torch.equal(again[k], params[k]) for k in params)
            print(f"\n{label} ({size / 2**20:.0f} MiB)")
            print(f"  {'':26} {'fedctl':>12} {'safetensors':>12} {'ratio':>7}")
            for name, (ours, theirs) in rows.items():
                print(
                    f"  {name:26} {ours * 1000:9.1f} ms {theirs * 1000:9.1f} ms "
                    f"{ours / theirs:6.2f}×  ({size / ours / 2**30:.2f} GiB/s ours)"
                )
        print("\nfiles written by either are read by the other, bit for bit")
    return 0


def _touch(value: Any) -> float:
    """Read every byte (a library that maps the file defers the reading to first use)."""
    import torch

    values = value.values() if isinstance(value, dict) else [value]
    return float(sum(float(torch.sum(t)) for t in values))


def _sha(path: Path) -> str:
    from fedctl._fs import sha256_file

    return sha256_file(path)


def _one(st: Any, path: Path) -> Any:
    with st.safe_open(str(path), framework="pt") as f:
        return f.get_tensor("layer0.weight")


if __name__ == "__main__":
    raise SystemExit(main())
