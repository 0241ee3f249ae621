"""Compression against accuracy: bytes on the wire, time per round and accuracy after N rounds.

    python bench/bench_compression.py            # 50 sites, 10 per round, 30 rounds
    python bench/bench_compression.py --quick    # a smoke run (20 sites, 3 rounds)

Every row runs the same non-IID task (bench/noniid: Dirichlet label skew, the same client
script, sites, seed, sampling and local training) with one ``compression`` setting; the global
model is evaluated on the server after each round on a balanced test set. Bytes are what the
run store counts on the wire: the broadcast once per target (down) and each result as it
arrives, before it is decoded (up). Not a unit test: it prints a table and the ratios to the
uncompressed row, all measured in this one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

SETTINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "fp16 both ways": {"result": "fp16", "task": "fp16"},
    "bf16 both ways": {"result": "bf16", "task": "bf16"},
    "int8 both ways": {"result": "int8", "task": "int8"},
    "top-k 10% + EF, int8 task": {"result": {"codec": "topk", "ratio": 0.1}, "task": "int8"},
    "top-k 10%, no EF": {"result": {"codec": "topk", "ratio": 0.1, "error_feedback": False}},
    "top-k 1% + EF": {"result": {"codec": "topk", "ratio": 0.01}},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--sample", type=float, default=0.2, help="fraction of sites per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 sites, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = 20, 3

    from fedctl.recipe import FedAvgRecipe, SimEnv, load_recipe
    from fedctl.sampling import sample_count

    base = load_recipe(ROOT / "noniid").recipe
    per_round = sample_count(args.sample, args.sites, 1)
    params = sum(t.numel() for t in base.initial_params().values())
    print(
        f"compression benchmark: {args.sites} sites, {per_round} per round, {args.rounds} "
        f"rounds of FedAvg on bench/noniid (alpha={args.alpha}, an MLP of {params} parameters, "
        f"1 local epoch, lr {args.lr}); seed {args.seed}; local backend",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedctl-bench-compression-") as tmp:
        # untimed: the first run in a process pays for imports and caches
        warm = base.with_overrides(num_rounds=1, min_clients=1, train_args="--epochs 1")
        warm.run(SimEnv(num_clients=2, backend="local", display="none", workspace=tmp))
        for label, spec in SETTINGS.items():
            recipe_spec = base.to_spec()
            recipe_spec.update(
                name="bench-compression",
                num_rounds=args.rounds,
                min_clients=per_round,
                sample_clients=args.sample,
                train_args=f"--alpha {args.alpha} --epochs 1 --lr {args.lr}",
                compression=spec,
            )
            recipe = FedAvgRecipe(**recipe_spec, model=base.model, base_dir=base.base_dir)
            env = SimEnv(
                num_clients=args.sites,
                backend="local",
                seed=args.seed,
                display="none",
                workspace=tmp,
            )
            t0 = time.monotonic()
            run = recipe.run(env)
            seconds = time.monotonic() - t0
            if not run.ok:
                print(f"{label}: {run.status}: {run.reason}", file=sys.stderr)
                return 1
            curve = [m["metrics"]["server_accuracy"] for m in run.metrics]
            rows.append(
                {
                    "label": label,
                    "down": sum(m["bytes_sent"] for m in run.metrics) / args.rounds,
                    "up": sum(m["bytes_received"] for m in run.metrics) / args.rounds,
                    "round_s": sum(m["duration"] for m in run.metrics) / args.rounds,
                    "final": curve[-1],
                    "best": max(curve),
                }
            )
            print(f"  {label}: {seconds:.0f}s", flush=True)
    ref = rows[0]
    print()
    print(
        "| compression | down per round (KiB) | up per round (KiB) | bytes vs none | "
        "s per round | final accuracy | best accuracy |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = (r["down"] + r["up"]) / (ref["down"] + ref["up"])
        print(
            f"| {r['label']} | {r['down'] / 1024:.1f} | {r['up'] / 1024:.1f} | {ratio:.3f} | "
            f"{r['round_s']:.2f} | {r['final']:.3f} | {r['best']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
