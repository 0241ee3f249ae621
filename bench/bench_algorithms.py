"""Non-IID comparison: FedAvg, FedProx, SCAFFOLD, FedNova and FedAdam on the same budget.

    python bench/bench_algorithms.py              # 30 sites, Dirichlet alpha=0.1, 30 rounds
    python bench/bench_algorithms.py --quick      # a smoke run (a few rounds)

Every algorithm runs the same client script (bench/noniid/client.py: the recipe alone picks the
algorithm), the same sites, data, seed, rounds and local epochs, in the simulator. The global
model is evaluated on the server after every round on a balanced test set of the task
(bench/noniid/evaluate.py). The table gives the final and best test accuracy, the mean over the
last five rounds, and the first round at which the accuracy reached the target. Several seeds
(``--seeds 3``) average out the luck of one initialisation (± is the spread of the final accuracy
over seeds; the other columns use the mean curve). "client drift" is the mean distance
‖w_local - w_global‖ a site's training moved the model in a round. Not a unit test: it prints
figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def build(kind: str, base: Any, args: argparse.Namespace, value: float | None = None) -> Any:
    """The benchmark recipe of one algorithm (same arguments as the FedAvg base)."""
    from fedctl.recipe import (
        FedAdamRecipe,
        FedAvgRecipe,
        FedNovaRecipe,
        FedProxRecipe,
        ScaffoldRecipe,
    )

    spec = base.to_spec()
    per_round = args.sites if args.sample is None else max(1, round(args.sample * args.sites))
    spec.update(
        name=f"bench-{kind}",
        num_rounds=args.rounds,
        min_clients=per_round,
        sample_clients=args.sample,
    )
    spec["train_args"] = (
        f"--alpha {args.alpha} --samples {args.samples} --quantity-skew {args.quantity_skew} "
        f"--epochs {args.epochs} --max-epochs {args.max_epochs} --lr {args.lr}"
    )
    extra: dict[str, Any] = {}
    cls: Any = FedAvgRecipe
    if kind == "fedprox":
        cls, extra = FedProxRecipe, {"mu": value}
    elif kind == "scaffold":
        cls = ScaffoldRecipe
    elif kind == "fednova":
        cls = FedNovaRecipe
    elif kind == "fedadam":
        cls, extra = FedAdamRecipe, {"eta": value}
    return cls(**spec, **extra, model=base.model, base_dir=base.base_dir)


def rounds_to(curve: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reached ``target``."""
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label skew")
    parser.add_argument("--samples", type=int, default=200, help="mean training samples/site")
    parser.add_argument("--quantity-skew", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="systems heterogeneity: sites draw 1..N local epochs each round (0: off)",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate")
    parser.add_argument(
        "--sample", type=float, default=None, help="fraction of sites per round (default: all)"
    )
    parser.add_argument("--mu", default="0.01,0.1", help="FedProx mu (a comma list: one row each)")
    parser.add_argument("--eta", default="0.01", help="FedAdam server lr (a comma list)")
    parser.add_argument("--target", type=float, default=0.75, help="accuracy target")
    parser.add_argument("--seeds", type=int, default=1, help="runs per algorithm (seeds 0..)")
    parser.add_argument(
        "--algorithms", default="fedavg,fedprox,scaffold,fednova,fedadam", help="comma list"
    )
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="10 sites, 5 rounds")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = 10, 5

    from fedctl.recipe import SimEnv, load_recipe

    base = load_recipe(ROOT / "noniid").recipe
    print(
        f"non-IID benchmark: {args.sites} sites, Dirichlet alpha={args.alpha}, "
        f"~{args.samples} samples/site (quantity skew {args.quantity_skew}), "
        f"{args.epochs} local epochs of SGD lr={args.lr}, {args.rounds} rounds, "
        f"{args.seeds} seed(s); target {args.target:.0%} test accuracy",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedctl-bench-alg-") as tmp:
        variants: list[tuple[str, str, float | None]] = []
        for kind in args.algorithms.split(","):
            values = {"fedprox": args.mu, "fedadam": args.eta}.get(kind)
            if values is None:
                variants.append((kind, kind, None))
                continue
            param = "mu" if kind == "fedprox" else "eta"
            for v in (float(x) for x in values.split(",")):
                variants.append((f"{kind} ({param}={v:g})", kind, v))
        for label, kind, value in variants:
            recipe = build(kind, base, args, value)
            curves, seconds, drifts = [], [], []
            for seed in range(args.seeds):
                env = SimEnv(
                    num_clients=args.sites,
                    backend=args.backend,
                    workers=args.workers,
                    seed=seed,
                    display="none",
                    workspace=tmp,
                )
                t0 = time.monotonic()
                run = recipe.run(env)
                seconds.append(time.monotonic() - t0)
                if not run.ok:
                    print(f"{label}: {run.status}: {run.reason}", file=sys.stderr)
                    failed.append(label)
                    break
                curves.append([r["metrics"]["server_accuracy"] for r in run.metrics])
                drifts.append(statistics.fmean(r["metrics"]["drift"] for r in run.metrics))
            if len(curves) < args.seeds:
                continue
            mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(args.rounds)]
            rows.append(
                {
                    "algorithm": label,
                    "final": mean_curve[-1],
                    "spread": statistics.pstdev(c[-1] for c in curves) if len(curves) > 1 else None,
                    "last5": statistics.fmean(mean_curve[-5:]),
                    "best": max(mean_curve),
                    "to_target": rounds_to(mean_curve, args.target),
                    "seconds": statistics.fmean(seconds),
                    "drift": statistics.fmean(drifts),
                }
            )
            print(f"  {label} done in {rows[-1]['seconds']:.1f}s", flush=True)

    print()
    head = (
        f"| algorithm | final acc | last-5 mean | best | rounds to {args.target:.0%} "
        "| client drift | s/run |"
    )
    print(head)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        reached = str(r["to_target"]) if r["to_target"] is not None else f"> {args.rounds}"
        final = f"{r['final']:.3f}" + (f" ± {r['spread']:.3f}" if r["spread"] is not None else "")
        print(
            f"| {r['algorithm']} | {final} | {r['last5']:.3f} | {r['best']:.3f} | "
            f"{reached} | {r['drift']:.2f} | {r['seconds']:.1f} |"
        )
    for label in failed:
        print(f"| {label} | failed (see above) | | | | | |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
