"""Swarm learning's relay cost (issue 16): the same job on a local POC (mutual TLS, 127.0.0.1)
with server aggregation (FedAvg) and with swarm learning (the sites aggregate; the server relays
payloads sealed site to site). Printed, measured in this one run: bytes through the server per
round (what it sent and received), mean round time (rounds 2…N: round 1 includes the scripts'
start), and the ratios swarm / FedAvg.

A swarm round moves each update twice through the server (trainer → server → aggregator) and
each new model twice (aggregator → server → trainer); FedAvg moves each once: about 2× the bytes.

    python bench/bench_swarm.py                    # 3 sites, 10M parameters, 4 rounds (~1 min)
    python bench/bench_swarm.py --params 1000000 --sites 5
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

CLIENT = """
import fedctl.client as flare

flare.init()
while flare.is_running():
    received = flare.receive()
    params = {k: v * 0.5 + 1.0 for k, v in received.params.items()}  # "training"
    flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(kind: str, env: Any, folder: Path, params: int, rounds: int, sites: int) -> dict:
    import torch

    from fedctl.recipe import FedAvgRecipe, SwarmRecipe

    cls = SwarmRecipe if kind == "swarm" else FedAvgRecipe
    model = {"w": torch.zeros(params, dtype=torch.float32)}
    recipe = cls(
        name=kind,
        min_clients=sites,
        num_rounds=rounds,
        model=model,
        train_script="client.py",
        key_metric=None,
        base_dir=folder,
    )
    result = recipe.run(env)
    if not result.ok:
        raise SystemExit(f"{kind} failed: {result.reason}")
    later = result.metrics[1:] or result.metrics
    return {
        "round_s": sum(m["duration"] for m in later) / len(later),
        "bytes": sum(m["bytes_sent"] + m["bytes_received"] for m in result.metrics) / rounds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    from fedctl.runtime import poc
    from fedctl.runtime.envs import PocEnv

    tmp = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    folder = tmp / "job"
    folder.mkdir()
    (folder / "client.py").write_text(CLIENT)
    ws = tmp / "poc"
    names = [f"site-{i + 1}" for i in range(args.sites)]
    poc.prepare(ws, sites=names, port=_free_port())
    poc.start(ws)
    try:
        env = PocEnv(workspace=ws, display="none", results=tmp / "results")
        res = {
            k: run(k, env, folder, args.params, args.rounds, args.sites)
            for k in ("fedavg", "swarm")
        }
    finally:
        poc.stop(ws)
        shutil.rmtree(tmp, ignore_errors=True)
    mb = args.params * 4 / 1e6
    print(
        f"POC, {args.sites} sites, {args.params:,} float32 parameters ({mb:.0f} MB), "
        f"{args.rounds} rounds"
    )
    for kind, r in res.items():
        print(
            f"  {kind:<7} {r['bytes'] / 1e6:9.1f} MB through the server per round "
            f"({r['bytes'] / (mb * 1e6 * args.sites):.2f} × model × sites), "
            f"mean round {r['round_s']:.2f} s"
        )
    b = res["swarm"]["bytes"] / res["fedavg"]["bytes"]
    t = res["swarm"]["round_s"] / res["fedavg"]["round_s"]
    print(f"  swarm / fedavg: {b:.2f}× the bytes, {t:.2f}× the round time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
