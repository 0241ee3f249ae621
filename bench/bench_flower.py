"""A Flower app under Flower's own simulation and under fedctl's (issue 18), measured in one run.

The app of ``tests_flower/app`` (Flower's FedAvg, 3 rounds) with 8 and 64 simulated sites: wall
time (start-up included) and peak PSS of the whole process tree (Ray's daemons and workers
included), each run in a fresh process. Needs the ``flower`` extra: run it with the Flower
virtual environment (``make install-flower``):

    .venv-flower/bin/python bench/bench_flower.py            # 8 and 64 sites (~3 minutes)
    .venv-flower/bin/python bench/bench_flower.py --sites 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "tests_flower" / "app"
FEDCTL_CHILD = """
import sys
from fedctl.recipe import FlowerRecipe, SimEnv
n, out, ws = int(sys.argv[1]), sys.argv[2], sys.argv[3]
run = FlowerRecipe(sys.argv[4], min_clients=n, run_config={"out": out}).run(
    SimEnv(num_clients=n, workspace=ws, display="none")
)
raise SystemExit(0 if run.ok else f"fedctl failed: {run.reason}")
"""


def measure(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """Wall time and peak PSS of the process tree of ``cmd``."""
    sys.path.insert(0, str(HERE))
    from bench_sim import measure_tree

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HOME": str(cwd / "home")}
    code, _, wall, peak = measure_tree(cmd, cwd=cwd, env=env)
    if code != 0:
        raise SystemExit(f"{cmd[1]} exited with {code}")
    return wall, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sites", default="8,64")
    args = p.parse_args()
    print("tests_flower/app (FedAvg, 3 rounds): Flower's simulation engine vs fedctl's SimEnv")
    print(f"  {'sites':>5} {'engine':<8} {'wall':>8} {'peak PSS':>10}")
    for n in (int(x) for x in args.sites.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
            d = Path(tmp)
            ref = str(HERE.parent / "tests_flower" / "flower_reference.py")
            flower = measure(
                [sys.executable, ref, str(APP), str(n), f"out={d / 'flower.safetensors'}"], d
            )
            ours = measure(
                [
                    sys.executable,
                    "-c",
                    FEDCTL_CHILD,
                    str(n),
                    str(d / "fedctl.safetensors"),
                    str(d / "ws"),
                    str(APP),
                ],
                d,
            )
        for name, (wall, peak) in (("flower", flower), ("fedctl", ours)):
            print(f"  {n:>5} {name:<8} {wall:>7.1f}s {peak / 2**30:>8.2f} GiB")
        print(
            f"  {n:>5} fedctl / flower: {ours[0] / flower[0]:.2f}× the wall time, "
            f"{ours[1] / flower[1]:.2f}× the peak memory"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
