"""Soak: long jobs must not grow. RSS, open files and threads of every long-lived process,
sampled as rounds complete, with the slope per 100 rounds.

    python bench/soak.py                          # 1,000 rounds in simulation, 300 on a POC
    python bench/soak.py --sim-rounds 200 --poc-rounds 60     # shorter
    make soak

Both run recipes/hello_pt (8 simulated sites on the default pool, ``--sim-backend ray`` for
Ray's; 2 POC sites). A sampler thread reads the number of completed rounds from the run's metrics
file and, at each new one, records for every process of the run: the driver and its whole tree
(the workers, their zygote or Ray's daemons) in simulation; the server, the job process, the site
agents and their client scripts on the POC (each POC process and its descendants, by role). The
slope is a least-squares fit over the rounds after the first 10 % (warm-up: imports, caches,
allocator arenas), without the last sample (it may catch the job's processes exiting). Not a unit
test: it prints figures, measured in this run, and says "flat" when a role's RSS grows less
than 1 MiB per 100 rounds (noise here is a few MiB, up and down).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
HELLO = ROOT.parent / "recipes" / "hello_pt"
FLAT_MIB_PER_100 = 1.0


def _sample(procs: dict[str, tuple[list[Any], bool]]) -> dict[str, dict[str, float]]:
    """RSS (MiB), open files and threads summed over each role's processes (and, when the
    role says so, their descendants)."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    for role, (roots, recursive) in procs.items():
        rss = fds = threads = 0.0
        count = 0
        for root in roots:
            try:
                tree = [root, *(root.children(recursive=True) if recursive else [])]
            except psutil.Error:
                continue
            for p in tree:
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss / 2**20
                        fds += p.num_fds()
                        threads += p.num_threads()
                        count += 1
                except psutil.Error:
                    continue
        out[role] = {"rss": rss, "fds": fds, "threads": threads, "procs": count}
    return out


class Sampler(threading.Thread):
    """Samples ``roles()`` each time the metrics file ``metrics()`` gains a line."""

    def __init__(self, metrics: Any, roles: Any) -> None:
        super().__init__(daemon=True)
        self.metrics, self.roles = metrics, roles
        self.rows: list[tuple[int, dict[str, dict[str, float]]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.stop.is_set():
            path = self.metrics()
            n = len(path.read_text().splitlines()) if path is not None and path.exists() else 0
            if n > seen:
                seen = n
                roles = self.roles()
                if roles:
                    self.rows.append((n, _sample(roles)))
            self.stop.wait(0.05)


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value per round."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def report(title: str, rows: list[tuple[int, dict[str, dict[str, float]]]], seconds: float) -> None:
    print(f"\n{title}: {rows[-1][0] if rows else 0} rounds sampled in {seconds:.0f}s")
    print(
        "| process | procs | RSS first (MiB) | RSS last (MiB) | RSS slope (MiB/100 rounds) | "
        "fds first → last | threads first → last | verdict |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    if not rows:
        return
    warm = max(1, len(rows) // 10)
    series: dict[str, list[tuple[int, dict[str, float]]]] = defaultdict(list)
    for rnd, sample in rows:
        for role, values in sample.items():
            series[role].append((rnd, values))
    for role, points in series.items():
        # the last sample may catch the job ending (scripts exiting): not steady state
        steady = points[warm:-1] if len(points) > warm + 2 else points
        s = slope([(r, v["rss"]) for r, v in steady]) * 100
        first, last = steady[0][1], steady[-1][1]
        verdict = "flat" if abs(s) < FLAT_MIB_PER_100 else "GROWS" if s > 0 else "shrinks"
        fd_s = slope([(r, v["fds"]) for r, v in steady]) * 100
        th_s = slope([(r, v["threads"]) for r, v in steady]) * 100
        if abs(fd_s) >= 1 or abs(th_s) >= 1:
            verdict += f" (fds {fd_s:+.1f}, threads {th_s:+.1f} per 100 rounds)"
        print(
            f"| {role} | {int(last['procs'])} | {first['rss']:.0f} | {last['rss']:.0f} | "
            f"{s:+.2f} | {int(first['fds'])} → {int(last['fds'])} | "
            f"{int(first['threads'])} → {int(last['threads'])} | {verdict} |"
        )


def soak_sim(rounds: int, tmp: Path, backend: str = "auto") -> None:
    import psutil

    from fedctl.recipe import SimEnv, load_recipe

    recipe = load_recipe(HELLO).recipe.with_overrides(num_rounds=rounds, key_metric=None)
    ws = tmp / "sim"
    me = psutil.Process()

    def metrics() -> Path | None:
        runs = sorted(ws.glob("*/metrics/global.jsonl"))
        return runs[-1] if runs else None

    def roles() -> dict[str, tuple[list[Any], bool]]:
        try:
            tree = me.children(recursive=True)
            names = {p: " ".join(p.cmdline()) for p in tree}
            zygotes = [p for p in me.children() if "fedctl.sim.zygote" in names.get(p, "")]
            forked = [c for z in zygotes for c in z.children()]
        except psutil.Error:
            return {}
        workers = [p for p, n in names.items() if n.startswith("ray::")] + forked
        daemons = [p for p in tree if p not in workers and p not in zygotes]
        out = {
            "driver (the workflow, the run store)": ([me], False),
            "simulator workers": (workers, False),
        }
        if zygotes:
            out["the workers' zygote"] = (zygotes, False)
        if daemons:
            out["Ray's daemons (GCS, raylet, agents)"] = (daemons, False)
        return out

    sampler = Sampler(metrics, roles)
    sampler.start()
    t0 = time.monotonic()
    run = recipe.run(SimEnv(num_clients=8, workspace=ws, display="none", backend=backend))
    sampler.stop.set()
    sampler.join()
    if not run.ok:
        raise SystemExit(f"simulation soak: {run.status}: {run.reason}")
    title = f"simulation (hello_pt, 8 sites, {run.extra.get('backend', backend)} backend)"
    report(title, sampler.rows, time.monotonic() - t0)


def soak_poc(rounds: int, tmp: Path) -> None:
    import psutil

    from fedctl.recipe import load_recipe
    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    ws = tmp / "poc"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    poc.prepare(ws, clients=2, port=port)
    poc.start(ws)
    try:
        records = {p.stem: json.loads(p.read_text()) for p in (ws / "run").glob("*.json")}

        def roles() -> dict[str, tuple[list[Any], bool]]:
            out: dict[str, tuple[list[Any], bool]] = {}
            for name, rec in records.items():
                try:
                    proc = psutil.Process(rec["pid"])
                    kids = proc.children()
                    jobs = [k for k in kids if "jobproc" in " ".join(k.cmdline())]
                except psutil.Error:
                    continue
                if name == "server":
                    out["server"] = ([proc], False)
                    out["job process"] = (jobs, True)
                else:
                    out[f"{name} (agent + script)"] = ([proc], True)
            return out

        kit = Path(poc.load_info(ws)["server"])

        def metrics() -> Path | None:
            found = sorted((kit / "workspace").glob("**/metrics/global.jsonl"))
            return found[-1] if found else None

        sampler = Sampler(metrics, roles)
        sampler.start()
        recipe = load_recipe(HELLO).recipe.with_overrides(num_rounds=rounds, key_metric=None)
        t0 = time.monotonic()
        run = recipe.run(PocEnv(workspace=ws, display="none", results=tmp / "poc-results"))
        sampler.stop.set()
        sampler.join()
        if not run.ok:
            raise SystemExit(f"POC soak: {run.status}: {run.reason}")
        report("POC (hello_pt, 2 sites)", sampler.rows, time.monotonic() - t0)
        print(
            "(the server row is the server process alone, the job process its child; each "
            "site's row is its agent and the client script it runs)"
        )
    finally:
        poc.stop(ws)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-rounds", type=int, default=1000)
    parser.add_argument("--poc-rounds", type=int, default=300)
    parser.add_argument(
        "--sim-backend", default="auto", choices=["auto", "process", "ray"], help="SimEnv.backend"
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="fedctl-soak-") as tmp:
        if args.sim_rounds:
            soak_sim(args.sim_rounds, Path(tmp), args.sim_backend)
        if args.poc_rounds:
            soak_poc(args.poc_rounds, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
