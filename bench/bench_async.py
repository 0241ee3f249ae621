"""Asynchronous aggregation benchmark (issue 16): simulated time to a target accuracy.

The non-IID task of ``recipes/async`` (fedopt's client and data; 10 sites, Dirichlet α = 0.3)
with site speeds spread tenfold (``SimEnv(speeds={"spread": 10})``: each site's factor is
log-uniform in [1, 10], a task takes ``factor`` virtual seconds). FedAvg waits for its slowest
site every round; FedBuff (K = 3) and FedAsync (α = 0.6, polynomial staleness a = 0.5) never
wait. The same number of client updates (tasks) is given to each, and the server evaluates every
new global model on a balanced test set. Printed: simulated time and updates until the accuracy
first reaches the target, the best accuracy, and the run's wall time on this machine.

    python bench/bench_async.py                  # target 0.75, 300 updates each (~1 minute)
    python bench/bench_async.py --target 0.7 --updates 150
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "async" / "fedbuff.py"
SITES = 10


def run_one(kind: str, updates: int, seed: int, workspace: Path) -> dict[str, Any]:
    """One algorithm for about ``updates`` client updates; its per-model history."""
    from fedctl.recipe import FedAsyncRecipe, FedAvgRecipe, FedBuffRecipe, SimEnv
    from fedctl.recipe.loader import load_recipe

    base = load_recipe(RECIPE).recipe
    common = {
        "name": kind,
        "min_clients": 3,
        "model": base.model,
        "train_script": "client.py",
        "train_args": base.train_args,
        "base_dir": base.base_dir,
        "server_eval": "evaluate.py:evaluate",
        "key_metric": "server_accuracy",
    }
    if kind == "fedavg":
        recipe: Any = FedAvgRecipe(num_rounds=updates // SITES, **common)
    elif kind == "fedbuff":
        recipe = FedBuffRecipe(num_rounds=updates // 3, buffer_size=3, **common)
    else:
        recipe = FedAsyncRecipe(num_rounds=updates, alpha=0.6, eval_every=1, **common)
    env = SimEnv(
        num_clients=SITES,
        backend="local",
        display="none",
        seed=seed,
        workspace=workspace,
        speeds={"spread": 10.0},
    )
    t0 = time.perf_counter()
    run = recipe.run(env)
    if not run.ok:
        raise SystemExit(f"{kind} failed: {run.reason}")
    history = [
        (r["sim_time"], r["metrics"].get("server_accuracy"), r["accepted"]) for r in run.metrics
    ]
    return {"wall": time.perf_counter() - t0, "history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(
        f"non-IID task, {SITES} sites, speeds spread 10×, {args.updates} client updates each, "
        f"target server accuracy {args.target}"
    )
    print(
        f"  {'algorithm':<9} {'sim. time to target':>20} {'updates to target':>18} "
        f"{'best acc.':>10} {'sim. time, all':>15} {'wall':>7}"
    )
    times: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        for kind in ("fedavg", "fedbuff", "fedasync"):
            res = run_one(kind, args.updates, args.seed, Path(tmp) / kind)
            hit, used = None, 0
            for sim_time, acc, accepted in res["history"]:
                used += accepted
                if acc is not None and acc >= args.target:
                    hit = (sim_time, used)
                    break
            best = max(a for _, a, _ in res["history"] if a is not None)
            times[kind] = hit[0] if hit else None
            shown = f"{hit[0]:.1f} s" if hit else "not reached"
            count = str(hit[1]) if hit else "-"
            print(
                f"  {kind:<9} {shown:>20} {count:>18} {best:>10.3f} "
                f"{res['history'][-1][0]:>13.1f} s {res['wall']:>6.1f}s"
            )
    avg = times.get("fedavg")
    for kind in ("fedbuff", "fedasync"):
        t = times.get(kind)
        if avg and t:
            print(f"  {kind} reaches the target in {t / avg:.2f}× FedAvg's simulated time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
