"""Joining an existing Ray cluster (``SimEnv(ray_address=...)``): slow, starts its own Ray head
(``ray start``, joined with "auto" and with its explicit address) and a two-node cluster on this
machine (``ray.cluster_utils.Cluster``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")

SCRIPT = """
import json, sys
from fedctl.recipe import load_recipe, SimEnv
r = load_recipe(sys.argv[1]).recipe.with_overrides(num_rounds=2)
run = r.run(SimEnv(num_clients=3, ray_address=sys.argv[2], workspace=sys.argv[3], display="none"))
print(json.dumps({"status": run.status, "reason": run.reason}))
"""

MULTI_NODE = """
import json, sys
from ray.cluster_utils import Cluster
from fedctl.recipe import load_recipe, SimEnv
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    r = load_recipe(sys.argv[1]).recipe.with_overrides(num_rounds=2)
    env = SimEnv(num_clients=4, ray_address=cluster.address, workspace=sys.argv[2], display="none")
    run = r.run(env)
    print(json.dumps({"status": run.status, "reason": run.reason, "final": str(run.final_model),
                      "nodes": run.extra.get("ray_nodes"), "workers": run.extra["workers"]}))
finally:
    cluster.shutdown()
"""


def _run(address: str, tmp_path: Path, env: dict[str, str], script: str = SCRIPT) -> dict:
    args = [address] if script is SCRIPT else []
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(REPO / "recipes" / "hello_pt"),
            *args,
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _clean_env(tmp_path: Path) -> dict[str, str]:
    # A clean environment: a Ray instance of this test process may have exported RAY_* variables
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.mark.slow
def test_simulation_joins_an_existing_cluster(tmp_path) -> None:
    from conftest import free_port

    env = _clean_env(tmp_path)
    port = free_port()
    start = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=120)
    try:
        assert _run("auto", tmp_path, env) == {"status": "FINISHED", "reason": None}
        explicit = _run(f"127.0.0.1:{port}", tmp_path, env)
        assert explicit == {"status": "FINISHED", "reason": None}
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_a_two_node_cluster_spreads_the_workers_and_gives_the_same_model(
    tmp_path, ray_cluster
) -> None:
    """Workers go round-robin over the nodes; the model is the single-node run's with as many
    workers, bit for bit (same recipe, same seed)."""
    from fedctl.codec.tensorfiles import load_file
    from fedctl.recipe import SimEnv, load_recipe

    out = _run("", tmp_path, _clean_env(tmp_path), MULTI_NODE)
    assert out["status"] == "FINISHED", out["reason"]
    assert out["nodes"] == 2 and out["workers"] == 2  # one per CPU of the cluster
    recipe = load_recipe(REPO / "recipes" / "hello_pt").recipe.with_overrides(num_rounds=2)
    local = recipe.run(
        SimEnv(num_clients=4, workers=2, workspace=tmp_path / "local", display="none")
    )
    cluster, single = load_file(out["final"])[0], local.load_final()
    assert cluster.keys() == single.keys()
    assert all(torch_equal(cluster[k], single[k]) for k in single)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_unreachable_cluster_fails_fast(tmp_path) -> None:
    import time

    from fedctl.recipe import SimEnv, load_recipe

    recipe = load_recipe(REPO / "recipes" / "hello_pt").recipe
    started = time.monotonic()
    run = recipe.run(
        SimEnv(num_clients=2, ray_address="127.0.0.1:1", workspace=tmp_path, display="none")
    )
    assert run.status == "FAILED" and "cannot reach the Ray cluster at 127.0.0.1:1" in run.reason
    assert time.monotonic() - started < 30
