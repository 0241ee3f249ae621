"""Scale benchmark (issue 15): 10,000 virtual clients beside 1,000, 100 sampled per round.

Both runs are the SCAFFOLD recipe of ``recipes/scaffold`` (per-site control variates kept in
``fedctl.client.get_state()``) with ``sample_clients=100`` for 20 rounds on the default
``SimEnv`` (the process backend). Each run is a fresh child process; the parent samples the
memory of the child's whole process tree (``bench_sim.tree_memory``: workers and zygote
included, shared memory counted whole). Printed, measured in this one invocation:

* peak memory of 10,000 clients ÷ peak of 1,000 (target ≤ 1.5);
* mean round time of 10,000 ÷ that of 1,000, rounds 2…N (target: independent of the total,
  here ≤ 1.25, which is within this machine's run-to-run noise); with ``--repeat N`` the two
  sizes run N times, alternating, and each ratio is the median of the N pairs' (a single pair
  read 1.26 once when the 1,000-client run happened to be unusually fast);
* what the run folder holds: per-site state files (one per site ever sampled, none for the
  others) and their size on disk, so no per-site state is held in RAM for all sites.

    python bench/bench_scale.py                 # 1,000 and 10,000 clients × 20 rounds (~2 min)
    python bench/bench_scale.py --repeat 3      # median of three alternating pairs (~6 min)
    python bench/bench_scale.py --rounds 5      # a glance
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "scaffold"
SAMPLED = 100


def child(clients: int, rounds: int) -> dict[str, Any]:
    """One run of the SCAFFOLD recipe with ``clients`` virtual sites, 100 sampled per round."""
    from fedctl.recipe import SimEnv
    from fedctl.recipe.loader import load_recipe

    recipe = load_recipe(RECIPE).recipe.with_overrides(
        num_rounds=rounds, min_clients=SAMPLED, sample_clients=SAMPLED, train_args="--epochs 1"
    )
    workspace = Path(tempfile.mkdtemp(prefix="fedctl-scale-"))
    try:
        run = recipe.run(SimEnv(num_clients=clients, workspace=workspace, display="none"))
        if not run.ok:
            raise SystemExit(f"run with {clients} clients failed: {run.reason}")
        states = list(run.result_dir.glob("sites/*/state.safetensors"))
        return {
            "round_times": [r["duration"] for r in run.metrics],
            "accepted": [r["accepted"] for r in run.metrics],
            "timings": run.extra["timings"],
            "state_files": len(states),
            "state_bytes": sum(p.stat().st_size for p in states),
            "site_folders": sum(1 for _ in run.result_dir.glob("sites/*")),
        }
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def measure(clients: int, rounds: int) -> dict[str, Any]:
    """Run ``child`` in a fresh process; wall time and the process tree's peak memory
    (``bench_sim.tree_memory``), from outside."""
    sys.path.insert(0, str(HERE))
    from bench_sim import measure_tree

    cmd = [sys.executable, __file__, "--child", str(clients), "--rounds", str(rounds)]
    code, stdout, wall, peak = measure_tree(cmd)
    if code != 0:
        raise SystemExit(f"{clients} clients: exit code {code}")
    data: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    data.update(wall=wall, peak_mem=peak)
    return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="alternating pairs; medians reported")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return 0
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    pairs = [{n: measure(n, args.rounds) for n in (1000, 10_000)} for _ in range(args.repeat)]
    print(f"SCAFFOLD, {SAMPLED} sampled sites per round, {args.rounds} rounds, default SimEnv")

    def mean_round(r: dict[str, Any]) -> float:
        later = r["round_times"][1:] or r["round_times"]
        return sum(later) / len(later)

    for i, res in enumerate(pairs, 1):
        for n, r in res.items():
            print(
                f"  pair {i}, {n:>6} clients: wall {r['wall']:.1f} s, "
                f"peak memory {r['peak_mem'] / 2**30:.2f} GiB, "
                f"mean round {mean_round(r) * 1000:.0f} ms, "
                f"{r['state_files']} state files ({r['state_bytes'] / 2**20:.1f} MiB on disk), "
                f"{r['site_folders']} site folders"
            )
    mems = [res[10_000]["peak_mem"] / res[1000]["peak_mem"] for res in pairs]
    rounds = [mean_round(res[10_000]) / mean_round(res[1000]) for res in pairs]
    mem, per_round = statistics.median(mems), statistics.median(rounds)
    full = all(a == SAMPLED for res in pairs for r in res.values() for a in r["accepted"])

    def of(xs: list[float]) -> str:
        return f" (median of {', '.join(f'{x:.2f}' for x in xs)})" if len(xs) > 1 else ""

    print(
        f"  {'PASS' if mem <= 1.5 else 'SHORT'} peak memory 10,000 / 1,000 = {mem:.2f}{of(mems)} "
        "(≤ 1.5)"
    )
    print(
        f"  {'PASS' if per_round <= 1.25 else 'SHORT'} mean round time 10,000 / 1,000 = "
        f"{per_round:.2f}{of(rounds)} (≤ 1.25: set by the sampled sites, not the total)"
    )
    print(f"  {'PASS' if full else 'SHORT'} every round aggregated {SAMPLED} sites")
    return 0


if __name__ == "__main__":
    sys.exit(main())
