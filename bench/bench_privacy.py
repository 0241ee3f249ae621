"""Accuracy against ε: no DP, central DP (DP-FedAvg) and DP-SGD on the sites, on one task.

    python bench/bench_privacy.py              # 200 sites, 20% per round, 30 rounds
    python bench/bench_privacy.py --quick      # a smoke run (40 sites, 4 rounds, ε = 8 only)

Every row runs the same non-IID task (bench/noniid: Dirichlet label skew, the same client
script), sites, seed, rounds, client sampling and local training in the simulator; the global
model is evaluated on the server after every round on a balanced test set.

* **no DP**: FedAvg (ε = ∞).
* **central DP**: the recipe's ``central_dp`` (DP-FedAvg, user-level: one site's whole data).
  The clip norm C is the median update norm of the no-DP run (a benchmark shortcut: choosing C
  from the data is itself a release; ``adaptive`` clipping does it privately), and for each
  target ε the noise multiplier z is the smallest (by bisection on fedctl's accountant) whose ε
  after all rounds stays within the target, so the run reaches its budget at the last round.
* **DP-SGD**: ``flare.make_private`` on every site (sample-level: one sample of one site), with
  ``target_epsilon`` over the epochs of the most-sampled site (the seeded sampling is known in
  advance here), so no site exceeds the target and that site reaches it; the ε shown is the
  largest any site reported.

The two ε are not the same protection: central DP's protects a whole site's data and trusts
the server with individual updates; DP-SGD's protects one record of a site against everyone,
the server included (docs/privacy.md). Not a unit test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def noise_for(target: float, clip: float, delta: float, rounds: int, m: int, n: int) -> float:
    """The smallest central-DP noise multiplier whose ε after ``rounds`` is within ``target``."""
    from fedctl.privacy.dp import CentralDP, epsilon

    def eps(z: float) -> float:
        return epsilon(CentralDP(z, clip, delta), rounds, m, n)

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
    for _ in range(14):  # relative precision ~ (hi/lo)^(1/2^14)
        mid = (lo * hi) ** 0.5
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def most_rounds(sites: list[str], sample: float, per_round: int, seed: int, rounds: int) -> int:
    """How many rounds the most-sampled site trains in (fedctl's seeded client sampling)."""
    from fedctl.sampling import sample_sites

    count = dict.fromkeys(sites, 0)
    for rnd in range(rounds):
        for s in sample_sites(sites, sample, per_round, seed, rnd):
            count[s] += 1
    return max(count.values())


def site_records(run: Any) -> list[dict[str, Any]]:
    lines = (run.result_dir / "metrics" / "sites.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--sample", type=float, default=0.2, help="fraction of sites per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--samples", type=int, default=200, help="training samples per site")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.2, help="local SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epsilons", default="8,4,1", help="target ε (a comma list)")
    parser.add_argument("--delta", type=float, default=1e-4, help="δ of both mechanisms")
    parser.add_argument(
        "--clip",
        type=float,
        default=None,
        help="central DP clip norm (default: the median update norm of the no-DP run)",
    )
    parser.add_argument("--dp-clip", type=float, default=2.0, help="DP-SGD per-sample clip norm")
    parser.add_argument("--dp-lr", type=float, default=None, help="DP-SGD lr (default: --lr)")
    parser.add_argument("--mechanisms", default="none,central,dpsgd", help="comma list")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="40 sites, 4 rounds, ε = 8")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds, args.epsilons = 40, 4, "8"
    mechanisms = args.mechanisms.split(",")
    epsilons = [float(e) for e in args.epsilons.split(",")]

    from fedctl.recipe import FedAvgRecipe, SimEnv, load_recipe
    from fedctl.sampling import sample_count

    base = load_recipe(ROOT / "noniid").recipe
    per_round = sample_count(args.sample, args.sites, 1)
    sites = [f"site-{i + 1}" for i in range(args.sites)]
    train = (
        f"--alpha {args.alpha} --samples {args.samples} --quantity-skew 0 "
        f"--epochs {args.epochs} --batch-size {args.batch_size}"
    )
    print(
        f"privacy benchmark: {args.sites} sites with {args.samples} samples each, Dirichlet "
        f"alpha={args.alpha}, {per_round} sites per round ({args.sample:.0%}), {args.rounds} "
        f"rounds of FedAvg, {args.epochs} local epoch(s) of SGD (batch {args.batch_size}, lr "
        f"{args.lr}); δ = {args.delta:g}; seed {args.seed}",
        flush=True,
    )

    def recipe(name: str, extra: str, lr: float, **kw: Any) -> Any:
        spec = base.to_spec()
        spec.update(
            name=f"bench-privacy-{name}",
            num_rounds=args.rounds,
            min_clients=per_round,
            sample_clients=args.sample,
            train_args=f"{train} --lr {lr} {extra}".strip(),
            **kw,
        )
        return FedAvgRecipe(**spec, model=base.model, base_dir=base.base_dir)

    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedctl-bench-privacy-") as tmp:

        def run(label: str, rec: Any) -> Any:
            env = SimEnv(
                num_clients=args.sites,
                backend=args.backend,
                workers=args.workers,
                seed=args.seed,
                display="none",
                workspace=tmp,
            )
            t0 = time.monotonic()
            result = rec.run(env)
            seconds = time.monotonic() - t0
            if not result.ok:
                print(f"{label}: {result.status}: {result.reason}", file=sys.stderr)
                failed.append(label)
                return None, seconds
            print(f"  {label} done in {seconds:.0f}s", flush=True)
            return result, seconds

        def row(label: str, target: str, result: Any, seconds: float, **kw: Any) -> None:
            curve = [r["metrics"]["server_accuracy"] for r in result.metrics]
            rows.append(
                {
                    "label": label,
                    "target": target,
                    "final": curve[-1],
                    "best": max(curve),
                    "rounds": result.rounds_completed,
                    "seconds": seconds,
                    **kw,
                }
            )

        clip = args.clip
        if "none" in mechanisms or (clip is None and "central" in mechanisms):
            result, seconds = run("no DP", recipe("none", "", args.lr))
            if result is not None:
                row("no DP", "∞", result, seconds, reached="∞", noise="")
                norms = [
                    r["metrics"]["drift"] for r in site_records(result) if r["ok"] and r["metrics"]
                ]
                if clip is None:
                    clip = round(statistics.median(norms), 3)
        if "central" in mechanisms and clip is not None:
            for eps in epsilons:
                z = noise_for(eps, clip, args.delta, args.rounds, per_round, args.sites)
                dp = {
                    "noise_multiplier": z,
                    "clip": clip,
                    "target_epsilon": eps,
                    "delta": args.delta,
                }
                label = f"central DP ε={eps:g}"
                result, seconds = run(label, recipe(f"central-{eps:g}", "", args.lr, central_dp=dp))
                if result is not None:
                    reached = result.extra["privacy"]["epsilon"]
                    row(label, f"{eps:g}", result, seconds, reached=f"{reached:.2f}", noise=z)
        if "dpsgd" in mechanisms:
            busiest = most_rounds(sites, args.sample, per_round, args.seed, args.rounds)
            epochs = busiest * args.epochs
            lr = args.dp_lr if args.dp_lr is not None else args.lr
            for eps in epsilons:
                label = f"DP-SGD ε={eps:g}"
                extra = (
                    f"--dp-epsilon {eps} --dp-epochs {epochs} --dp-clip {args.dp_clip} "
                    f"--dp-delta {args.delta}"
                )
                result, seconds = run(label, recipe(f"dpsgd-{eps:g}", extra, lr))
                if result is not None:
                    records = [r["metrics"] for r in site_records(result) if r["ok"]]
                    reached = max(m["dp_site_epsilon"] for m in records if "dp_site_epsilon" in m)
                    sigma = next(m["dp_sigma"] for m in records if "dp_sigma" in m)
                    row(label, f"{eps:g}", result, seconds, reached=f"{reached:.2f}", noise=sigma)
            print(
                f"  DP-SGD: σ for {epochs} epochs (the most-sampled site trains in {busiest} of "
                f"{args.rounds} rounds), per-sample clip {args.dp_clip}, lr {lr}",
                flush=True,
            )
        if clip is not None and "central" in mechanisms:
            print(f"  central DP: clip C = {clip} (median update norm without DP)", flush=True)

    print()
    print(
        "| privacy | target ε | ε reached | noise multiplier | final acc | best acc | rounds "
        "| time (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        noise = f"{r['noise']:.3f}" if isinstance(r["noise"], float) else "–"
        print(
            f"| {r['label']} | {r['target']} | {r['reached']} | {noise} | {r['final']:.3f} | "
            f"{r['best']:.3f} | {r['rounds']} | {r['seconds']:.0f} |"
        )
    for label in failed:
        print(f"| {label} | failed (see above) | | | | | | |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
